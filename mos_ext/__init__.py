"""mos_ext: Mixture-of-Shards (MoS) and shard-sharing LoRA adapters as torch ops.

Importing the package loads the native library, which registers the
``torch.ops.mos`` operators (see :mod:`mos_ext.ops` for their semantics and
:mod:`mos_ext.reference` for the plain-PyTorch oracle).
"""
import torch  # noqa: F401  (the native library links against torch's libs)

from . import _C
from . import ops
from .ops import (PoolGradTaps, gather_shards, pool_grad_tap, sgmv, sgmv_expand, sgmv_shrink, shard_grad,
                  sharded_lora, validate_segments, validate_tables)
from .settings import (available_cpu_isas, cpu_dense_min_tokens, cpu_isa, cuda_built, deterministic_grads,
                       deterministic_grads_enabled, device_index_checks_enabled, get_cuda_path, index_checks,
                       index_checks_enabled, set_cpu_dense_min_tokens, set_cpu_isa, set_cuda_path,
                       set_deterministic_grads, set_device_index_checks, set_index_checks)

__version__ = "0.1.0"

_LAZY = {
    "MoSConfig": ".config",
    "MoSLinear": ".layers",
    "MoSModel": ".model",
    "get_mos_model": ".convert",
    "export_lora": ".convert",
    "import_adapter": ".convert",
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
    ops, serving and the vLLM plugin still work (``.importlinter`` keeps them free of peft); an unsupported peft version raises here, naming it."""
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
    "import_adapter",
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
    "set_cuda_path",
    "get_cuda_path",
]
