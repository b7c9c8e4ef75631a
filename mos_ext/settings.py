"""Runtime switches of mos_ext, all in one place (the floor under the ops).

Each switch is backed by the native library's flags (``csrc/checks.cpp``), set from the
environment at import, except the CUDA kernel path, which the CUDA ops read from
``MOS_EXT_CUDA_PATH`` on every call. ``mos_ext`` re-exports every function here.
"""
from __future__ import annotations

import contextlib
import os

from . import _C

__all__ = ["set_index_checks", "index_checks_enabled", "index_checks", "set_device_index_checks",
           "device_index_checks_enabled", "set_deterministic_grads", "deterministic_grads_enabled",
           "deterministic_grads", "cpu_isa", "set_cpu_isa", "available_cpu_isas", "cpu_dense_min_tokens",
           "set_cpu_dense_min_tokens", "cuda_built", "set_cuda_path", "get_cuda_path"]


def set_index_checks(enabled: bool) -> bool:
    """Turn the per-call value checks of index tables and segment metadata on or off.

    On by default (or as ``MOS_EXT_CHECK_INDICES=0`` says at import). The checks
    read ``idx_*``, ``seg_indptr`` and ``seg_tenant``. For CPU tensors they run on
    every call while this is on; for CUDA tensors they also need
    :func:`set_device_index_checks` (off by default: no per-call host sync), and
    never run while a stream is capturing a CUDA graph. With checks off,
    out-of-range indices or tenants are skipped like ``-1`` and segment bounds are
    clamped (never an out-of-bounds access), but the output is then not what was
    meant: validate tables once with :func:`validate_tables`. Returns the previous
    setting.
    """
    return _C.set_index_checks(bool(enabled))


def index_checks_enabled() -> bool:
    """Whether the per-call value checks of indices and segments are on (for CPU tensors)."""
    return _C.index_checks_enabled()


def set_device_index_checks(enabled: bool) -> bool:
    """Opt in (or out) of per-call value checks for tensors on a GPU.

    Off by default, or as ``MOS_EXT_CHECK_INDICES_DEVICE=1`` says at import. When on
    (and :func:`index_checks_enabled`), each CUDA call checks its index and segment
    tensors with a reduction on the device and one scalar device-to-host copy per
    tensor (a sync); skipped while the current stream is capturing a CUDA graph.
    For debugging; in training and serving validate once with
    :func:`validate_tables`. Returns the previous setting.
    """
    return _C.set_device_index_checks(bool(enabled))


def device_index_checks_enabled() -> bool:
    """Whether per-call value checks also run for GPU tensors."""
    return _C.device_index_checks_enabled()


@contextlib.contextmanager
def index_checks(enabled: bool, device=None):
    """Context manager form of :func:`set_index_checks` (and, when ``device`` is
    given, of :func:`set_device_index_checks`); restores the old settings."""
    previous = set_index_checks(enabled)
    prev_dev = set_device_index_checks(device) if device is not None else None
    try:
        yield
    finally:
        set_index_checks(previous)
        if prev_dev is not None:
            set_device_index_checks(prev_dev)


def set_deterministic_grads(enabled: bool) -> bool:
    """Deterministic pool gradients in training (``sharded_lora``'s backward and
    ``sgmv_shrink``'s): ``shard_grad(deterministic=True)``, a fixed-order reduction that
    is bitwise reproducible run to run (slower on CUDA than the atomic default).

    Also on while ``torch.use_deterministic_algorithms(True)`` is, or from import with
    ``MOS_EXT_DETERMINISTIC_GRADS=1``. The setting in effect when a forward pass runs
    also holds for its backward. Returns the previous setting.
    """
    return _C.set_deterministic_grads(bool(enabled))


def deterministic_grads_enabled() -> bool:
    """Whether pool gradients are deterministic now (the flag or torch's deterministic mode)."""
    return _C.deterministic_grads_enabled()


@contextlib.contextmanager
def deterministic_grads(enabled: bool = True):
    """Context manager form of :func:`set_deterministic_grads`."""
    previous = set_deterministic_grads(enabled)
    try:
        yield
    finally:
        set_deterministic_grads(previous)


def cpu_isa() -> str:
    """The instruction set the CPU kernels use ("base", "avx2" or "avx512")."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Select the CPU kernels' instruction set (for tests and benchmarks);
    ``MOS_EXT_CPU_ISA`` does the same at import. Raises ValueError when this
    CPU or build cannot run it."""
    _C.set_cpu_isa(name)


def available_cpu_isas() -> list:
    """Instruction sets this CPU and build can run, best last."""
    return list(_C.available_cpu_isas())


def cpu_dense_min_tokens() -> int:
    """Segment length from which the CPU ops take the BLAS path (0: never)."""
    return _C.cpu_dense_min_tokens()


def set_cpu_dense_min_tokens(n: int) -> int:
    """Per-shape dispatch of the CPU ops: a segment of at least ``n`` tokens with fp32/fp64
    activations gathers its tenant's ``A``/``B`` and runs ATen GEMMs (and ``shard_grad``
    accumulates the GEMM's [r, l*s] result into the pool rows); shorter segments, bf16/fp16,
    and ``shard_grad(deterministic=True)`` use the fused kernels. ``0`` turns the BLAS path
    off. ``MOS_EXT_CPU_DENSE_MIN_TOKENS`` sets it at import (default 32). The two paths agree
    to rounding; only the fused kernels are bitwise independent of the thread count.
    Returns the previous value; a negative ``n`` raises ValueError."""
    return _C.set_cpu_dense_min_tokens(int(n))


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return _C.cuda_built()


# CUDA kernel path (owned by the CUDA kernels; see csrc/cuda/launch.h)
_CUDA_PATHS = ("auto", "generic", "fast")


def set_cuda_path(mode: str) -> str:
    """Choose the CUDA kernels of ``sgmv`` / ``sgmv_shrink`` / ``sgmv_expand``; returns the previous mode.

    ``"auto"`` (default): the fast kernels (fp16/bf16 activations, pools in that dtype
    or fp32, shard lengths multiples of 8, 16-byte aligned rows and pools, rank <= 1024
    for the fused/expand kernels) wherever those hold, the generic kernels elsewhere;
    ``"generic"``: always the generic kernels; ``"fast"``: the fast kernels wherever
    they can run (the generic ones elsewhere). The choice is made on the host from
    dtypes, shapes, strides and pointer alignment only, so it is CUDA-graph safe.
    Backed by the environment variable ``MOS_EXT_CUDA_PATH``, which the CUDA ops read
    on every call; no effect on the CPU ops.

    The fast kernels (``csrc/cuda/sgmv_fast.cuh``, ``sgmv_prefill.cuh``, ``shard_grad_tc.cuh``):

    * decode / split halves (fp16, bf16): fp32 FMA accumulation like the generic
      kernels, one rounding of ``y``;
    * fused ``sgmv`` prefill (fp16 / bf16, rank <= 64, on average >= 32 tokens per
      segment): bf16 tensor cores, fp32 accumulation, gathered shards double-buffered
      through shared memory with ``cp.async``. Operands that are not bf16 are split into
      bf16 hi + lo (fp16 exactly, fp32 to ~16 bits), and so is ``v``; before ``y``'s one
      rounding the error is at most ``(3 + e) * 2**-16`` times the sum of the absolute
      products (plus fp32 accumulation error), ``e`` = 0 for bf16 ``x`` with bf16
      ``pool_a``, 1 for bf16 ``x`` with fp32 ``pool_a`` or fp16 with fp16, 2 for fp16 ``x``
      with fp32 ``pool_a``;
    * ``shard_grad`` (fp16, bf16): tensor cores (bf16 MMAs, fp32 accumulation) with
      ``u`` split into bf16 hi + lo and fp16 ``x`` split exactly into bf16 hi + lo: at
      most ``2**-16`` (bf16 ``x``) or ``2**-15`` (fp16 ``x``) relative per product, fp32
      sums; ``deterministic=False`` adds with vector atomics (which flush fp32 denormals
      to zero), ``deterministic=True`` in two passes (per-item partials, then a
      fixed-order reduction: bitwise reproducible), run over chunks of items whose
      partials fit in ``MOS_EXT_DET_PART_BYTES`` bytes (default 256 MiB, read on every
      call; the result is reproducible for a given value but depends on it).
    """
    if mode not in _CUDA_PATHS:
        raise ValueError(f"cuda path must be one of {_CUDA_PATHS}, got {mode!r}")
    previous = get_cuda_path()
    os.environ["MOS_EXT_CUDA_PATH"] = mode
    return previous


def get_cuda_path() -> str:
    """The CUDA kernel path in effect (``MOS_EXT_CUDA_PATH``, default ``"auto"``)."""
    return os.environ.get("MOS_EXT_CUDA_PATH", "") or "auto"
