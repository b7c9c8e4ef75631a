"""Build of mos_ext: the `mos` torch ops (C++ CPU kernels always, CUDA kernels
when torch has CUDA and nvcc is found).

Install (torch must already be installed; build isolation would fetch another torch):

    pip install torch==2.13.0 ninja
    pip install --no-build-isolation -e ".[test]"

Environment:
    MOS_EXT_CUDA=1|0          1: CUDA kernels or a hard error (never a silent CPU-only build);
                              0: CPU only; unset: CUDA when torch has CUDA and nvcc is found
    MOS_EXT_CUDA_ARCHS="80;90a"  CUDA architectures (default: 80;90a)
    MAX_JOBS=N                parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - message for the user
    sys.exit(
        "mos_ext: torch is not importable. Install torch first, then build without isolation:\n"
        "    pip install torch==2.13.0 ninja\n"
        "    pip install --no-build-isolation -e .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_toolkit():
    """(CUDA_HOME, nvcc path) as torch's extension builder will use them, or (None, None)."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME  # None whenever torch itself has no CUDA
    if home is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        if home is None and shutil.which("nvcc"):
            home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    if home is None:
        return None, None
    nvcc = os.path.join(home, "bin", "nvcc")
    return (home, nvcc) if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) else (home, None)


def want_cuda() -> bool:
    """MOS_EXT_CUDA=1: the CUDA kernels or a loud failure, never a silent CPU-only build.
    Unset: CUDA when torch has CUDA and a toolkit is found (with a warning when torch has CUDA
    but no toolkit is found). MOS_EXT_CUDA=0: CPU only."""
    flag = os.environ.get("MOS_EXT_CUDA", "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False
    home, nvcc = _cuda_toolkit()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    if home is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME to the toolkit root, or put nvcc on PATH)")
    elif nvcc is None:
        problems.append(f"CUDA_HOME={home} has no executable bin/nvcc")
    if flag in ("1", "true", "on", "yes"):
        if problems:
            sys.exit("mos_ext: MOS_EXT_CUDA=1 but the CUDA kernels cannot be built:\n  - " + "\n  - ".join(problems)
                     + "\n(unset MOS_EXT_CUDA to build the CPU ops only)")
        print(f"mos_ext: building the CUDA kernels with {nvcc} (torch {torch.__version__}, CUDA {torch.version.cuda})")
        return True
    if problems and torch.version.cuda is not None:
        print("mos_ext: WARNING: building the CPU ops only, without CUDA kernels: " + "; ".join(problems)
              + " (MOS_EXT_CUDA=1 makes this an error)", file=sys.stderr)
    return not problems


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
cxx_flags = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-ffp-contract=fast", "-Wall", "-Wno-unused-function"]
link_flags = ["-fopenmp"]

if want_cuda():
    archs = os.environ.get("MOS_EXT_CUDA_ARCHS", "80;90a").split(";")
    gencode = []
    for a in archs:
        a = a.strip()
        if a:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    ext = CUDAExtension(
        "mos_ext._C",
        cpu_sources
        + rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        + rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
        define_macros=[("MOS_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + gencode,
        },
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("mos_ext._C", cpu_sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)

setup(
    name="mos_ext",
    version="0.1.0",
    description="Mixture-of-Shards LoRA: torch ops (index-gather SGMV, fused pool gradients) for training and serving",
    packages=find_packages(include=["mos_ext", "mos_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors>=0.4"],
    # MoS is a PEFT method: the supported range is checked at import (mos_ext/_peft.py)
    # and tested with its oldest (0.18.1, by .ci/run) and newest (0.21.x) versions.
    extras_require={
        "bench": ["matplotlib"],  # the PNGs of benchmarks/ (skipped without it; tables and JSON are not)
        "train": ["transformers>=5.0", "peft>=0.18,<0.22", "accelerate>=1.0"],
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "numpy", "transformers>=5.0", "peft>=0.18,<0.22",
                 "accelerate>=1.0", "bitsandbytes>=0.45", "trl>=1.0", "datasets",
                 "openai>=1.0",  # tests/test_vllm.py drives the vLLM server (its own venv, see .ci/run)
                 "import-linter>=2.0"],  # lint-imports: the import contracts in .importlinter (.ci/run)
    },
    # the vLLM plugin (mos_ext/integrations/vllm.py): vLLM calls it in each of its processes;
    # MOS_EXT_VLLM_PLUGIN=0 switches it off
    entry_points={"vllm.general_plugins": ["mos_ext = mos_ext.integrations.vllm:register"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
