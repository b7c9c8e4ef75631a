import re, sys, os, glob
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in glob.glob(os.path.join(src, '*.cu')) + glob.glob(os.path.join(src, '*.cuh')) + glob.glob(os.path.join(src, '*.h')):
    s = open(f).read()
    s = s.replace('extern __shared__ __align__(16) unsigned char sgmv_dyn_smem[];', 'unsigned char* sgmv_dyn_smem = emu::dyn_smem();')
    s = re.sub(r'([\w:<>, ]+?)<<<(.*?)>>>\(', lambda m: 'emu::launch(%s, %s, ' % (m.group(2), m.group(1).strip()), s, flags=re.S)
    s = re.sub(r'template __global__ void [^;]*;', '', s, flags=re.S)
    name = os.path.basename(f)
    if name.endswith('.cu'): name = name[:-3] + '_cu.cpp'
    open(os.path.join(dst, name), 'w').write(s)
