"""mos_ext: Mixture-of-Shards (MoS) and shard-sharing LoRA adapters as torch ops.

Importing the package loads the native library, which registers the
``torch.ops.mos`` operators (see :mod:`mos_ext.ops` for their semantics and
:mod:`mos_ext.reference` for the plain-PyTorch oracle).
"""
import contextlib

import torch  # noqa: F401  (the native library links against torch's libs)

from . import _C
from . import ops
from .ops import (PoolGradTaps, gather_shards, pool_grad_tap, sgmv, sgmv_expand, sgmv_shrink, shard_grad,
                  sharded_lora, validate_segments, validate_tables)

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
    "set_device_index_checks",
    "device_index_checks_enabled",
    "validate_tables",
    "validate_segments",
    "set_deterministic_grads",
    "deterministic_grads_enabled",
    "deterministic_grads",
    "pool_grad_tap",
    "PoolGradTaps",
    "cpu_isa",
    "set_cpu_isa",
    "available_cpu_isas",
    "cpu_dense_min_tokens",
    "set_cpu_dense_min_tokens",
    "cuda_built",
]


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
