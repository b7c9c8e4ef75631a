"""Rewrite csrc/cuda sources into host C++ for the emulator: kernel launches
`k<<<grid, block, smem, stream>>>(args)` become `emu::launch(grid, block, smem,
stream, k, args)`, dynamic shared memory arrays point at the emulator's buffer,
explicit kernel instantiations are dropped (the launchers instantiate them)."""
import re, sys, os, glob
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in glob.glob(os.path.join(src, '*.cu')) + glob.glob(os.path.join(src, '*.cuh')) + glob.glob(os.path.join(src, '*.h')):
    s = open(f).read()
    s = re.sub(r'extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];',
               r'unsigned char* \1 = emu::dyn_smem();', s)
    s = re.sub(r'([\w:<>, ]+?)<<<(.*?)>>>\(', lambda m: 'emu::launch(%s, %s, ' % (m.group(2), m.group(1).strip()), s, flags=re.S)
    s = re.sub(r'template __global__ void [^;]*;', '', s, flags=re.S)
    name = os.path.basename(f)
    if name.endswith('.cu'): name = name[:-3] + '_cu.cpp'
    out = os.path.join(dst, name)
    # keep mtimes stable when nothing changed (ninja then skips the object)
    if not os.path.exists(out) or open(out).read() != s:
        open(out, 'w').write(s)
