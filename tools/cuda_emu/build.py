"""Build the emulator extension (see README.md): `import build; build.emu` or `build.load()`.

Needs g++ (C++20), ninja and the CUDA headers (cuda_runtime.h, cuda_fp16.h,
cuda_bf16.h): $CUDA_HOME/include, /usr/local/cuda-13.0/include, or the include
dir of the nvcc on PATH. No GPU, no CUDA build of torch."""
import glob
import os
import shutil
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.abspath(os.path.join(here, '..', '..'))


def cuda_include():
    cands = []
    if os.environ.get('CUDA_HOME'):
        cands.append(os.path.join(os.environ['CUDA_HOME'], 'include'))
    cands.append('/usr/local/cuda-13.0/include')
    nvcc = shutil.which('nvcc')
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), 'include'))
    for c in cands:
        if os.path.exists(os.path.join(c, 'cuda_bf16.h')) and os.path.exists(os.path.join(c, 'cuda_runtime.h')):
            return c
    return None


def load(verbose=False):
    from torch.utils.cpp_extension import load as torch_load
    inc = cuda_include()
    if inc is None:
        raise RuntimeError('cuda_emu: CUDA headers not found (set CUDA_HOME)')
    work = os.environ.get('MOS_EMU_BUILD', '/tmp/mos_cuda_emu')
    os.makedirs(os.path.join(work, 'build'), exist_ok=True)
    subprocess.check_call([sys.executable, os.path.join(here, 'prep.py'), os.path.join(root, 'csrc', 'cuda'),
                           os.path.join(work, 'gen')])
    subprocess.check_call([sys.executable, os.path.join(here, 'prep_reg.py'),
                           os.path.join(root, 'csrc', 'cuda', 'register_cuda.cpp'),
                           os.path.join(work, 'gen', 'register_emu.cpp'), root])
    srcs = sorted(glob.glob(os.path.join(work, 'gen', '*_cu.cpp'))) + [
        os.path.join(work, 'gen', 'register_emu.cpp'), os.path.join(here, 'emu_rt.cpp'), os.path.join(here, 'selftest.cpp'),
        os.path.join(root, 'csrc', 'checks.cpp')]
    return torch_load('mos_emu', srcs,
                      extra_cflags=['-std=c++20', '-O1', '-g0', '-include', os.path.join(here, 'emu.h'), '-I' + inc,
                                    '-w'],
                      extra_ldflags=['-lpthread'], build_directory=os.path.join(work, 'build'), verbose=verbose)


if __name__ != '__main__' and os.environ.get('MOS_EMU_NO_AUTOLOAD') != '1':
    emu = load()
