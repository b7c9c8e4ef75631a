"""The base layers adapters attach to, and their sizes (peft-free: used by the tuner and by serving)."""
from __future__ import annotations

from typing import Dict, Tuple

from torch import nn

try:  # GPT-2 style layers keep their weight as [in, out]
    from transformers.pytorch_utils import Conv1D as _Conv1D
except Exception:  # pragma: no cover - transformers is optional for the ops
    _Conv1D = None

try:
    import bitsandbytes as _bnb
except Exception:  # pragma: no cover - optional
    _bnb = None


def base_dims(base: nn.Module):
    """(in_features, out_features, kind) of a supported base layer; raises TypeError otherwise."""
    if _bnb is not None and isinstance(base, (_bnb.nn.Linear4bit, _bnb.nn.Linear8bitLt)):
        return base.in_features, base.out_features, "bnb"
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, "linear"
    if _Conv1D is not None and isinstance(base, _Conv1D):
        return base.weight.shape[0], base.weight.shape[1], "conv1d"
    raise TypeError(f"MoS adapters support nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt "
                    f"bases, got {type(base).__name__}")


def layer_dims(model: nn.Module, unwrap: bool = True) -> Dict[str, Tuple[int, int]]:
    """Module path -> (in_features, out_features) of every supported base layer of ``model``. With
    ``unwrap``, a PEFT tuner layer (anything with ``get_base_layer``) is also reported at its own path
    with its base layer's sizes."""
    dims = {}
    for name, mod in model.named_modules():
        get_base = getattr(mod, "get_base_layer", None) if unwrap else None
        base = get_base() if callable(get_base) else mod
        try:
            h, o, _ = base_dims(base)
        except TypeError:
            continue
        dims[name] = (h, o)
    return dims
