import os, glob, subprocess, sys
import torch
from torch.utils.cpp_extension import load
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.abspath(os.path.join(here, '..', '..'))
work = os.environ.get('MOS_EMU_BUILD', '/tmp/mos_cuda_emu')
os.makedirs(os.path.join(work, 'build'), exist_ok=True)
subprocess.check_call([sys.executable, os.path.join(here, 'prep.py'), os.path.join(root, 'csrc', 'cuda'), os.path.join(work, 'gen')])
subprocess.check_call([sys.executable, os.path.join(here, 'prep_reg.py'), os.path.join(root, 'csrc', 'cuda', 'register_cuda.cpp'), os.path.join(work, 'gen', 'register_emu.cpp'), root])
srcs = sorted(glob.glob(os.path.join(work, 'gen', '*_cu.cpp'))) + [os.path.join(work, 'gen', 'register_emu.cpp'), os.path.join(here, 'emu_rt.cpp'), os.path.join(root, 'csrc', 'checks.cpp')]
emu = load('mos_emu', srcs, extra_cflags=['-std=c++20', '-O1', '-g0', '-include', os.path.join(here, 'emu.h'), '-I/usr/local/cuda-13.0/include', '-w'],
           extra_ldflags=['-lpthread'], build_directory=os.path.join(work, 'build'), verbose=False)
