"""mos_ext: Mixture-of-Shards (MoS) and shard-sharing LoRA adapters as torch ops.

Importing the package loads the native library, which registers the
``torch.ops.mos`` operators (see :mod:`mos_ext.ops` for their semantics and
:mod:`mos_ext.reference` for the plain-PyTorch oracle).
"""
import contextlib

import torch  # noqa: F401  (the native library links against torch's libs)

from . import _C
from . import ops
from .ops import gather_shards, sgmv, sgmv_expand, sgmv_shrink, shard_grad, sharded_lora

__version__ = "0.1.0"

_LAZY = {
    "MoSConfig": ".config",
    "MoSLinear": ".layers",
    "MoSModel": ".model",
    "get_mos_model": ".api",
    "export_lora": ".api",
    "load_adapter": ".api",
    "read_adapter": ".adapter_io",
}


def __getattr__(name):
    """The training API (imports transformers and peft) loads on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'mos_ext' has no attribute {name!r}")


def _register_peft_method():
    """Make MoS a PEFT method as soon as mos_ext is imported, so that ``PeftModel.from_pretrained``
    and transformers' ``load_adapter`` read MoS adapter directories. Without peft installed the
    ops and serving still work; an unsupported peft version raises here, naming it."""
    import importlib.util

    if importlib.util.find_spec("peft") is not None:
        from . import model  # noqa: F401  (registers MoSConfig / MoSModel with PEFT)


_register_peft_method()

__all__ = [
    "MoSConfig",
    "MoSModel",
    "MoSLinear",
    "get_mos_model",
    "export_lora",
    "load_adapter",
    "read_adapter",
    "ops",
    "gather_shards",
    "sgmv",
    "sgmv_expand",
    "sgmv_shrink",
    "shard_grad",
    "sharded_lora",
    "set_index_checks",
    "index_checks_enabled",
    "index_checks",
    "cpu_isa",
    "set_cpu_isa",
    "available_cpu_isas",
    "cpu_dense_min_tokens",
    "set_cpu_dense_min_tokens",
    "cuda_built",
]


def set_index_checks(enabled: bool) -> bool:
    """Turn the value checks of index tables and segment metadata on or off.

    On by default (or as ``MOS_EXT_CHECK_INDICES=0`` says at import). The checks
    read ``idx_*``, ``seg_indptr`` and ``seg_tenant``; for CUDA tensors that is a
    device-to-host copy, so turn them off for CUDA-graph capture of a serving
    step. With checks off, out-of-range indices or tenants are skipped like
    ``-1`` and segment bounds are clamped (never an out-of-bounds access), but
    the output is then not what was meant. Returns the previous setting.
    """
    return _C.set_index_checks(bool(enabled))


def index_checks_enabled() -> bool:
    """Whether the value checks of indices and segments are on."""
    return _C.index_checks_enabled()


@contextlib.contextmanager
def index_checks(enabled: bool):
    """Context manager form of :func:`set_index_checks`; restores the old setting."""
    previous = set_index_checks(enabled)
    try:
        yield
    finally:
        set_index_checks(previous)


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
