"""MoSLinear: a frozen linear base plus a sharded adapter read from model-level pools."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops
from .pools import ShardPools

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
    raise TypeError(f"MoSLinear supports nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt "
                    f"bases, got {type(base).__name__}")


_SEG_CACHE: dict = {}


def single_segment(n: int, device: torch.device):
    """(seg_indptr [0, n], seg_tenant [0]) for a batch that is all one tenant (cached)."""
    key = (n, device)
    seg = _SEG_CACHE.get(key)
    if seg is None:
        if len(_SEG_CACHE) > 256:
            _SEG_CACHE.clear()
        seg = (torch.tensor([0, n], dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device))
        _SEG_CACHE[key] = seg
    return seg


class MoSLinear(nn.Module):
    """``y = base(x) + scale * B (A dropout(x))`` with ``A``, ``B`` gathered from shared pools.

    The pools belong to the model (one :class:`ShardPools` per projection type); the layer
    holds a reference that is not registered as a submodule, so state dicts hold each pool
    once. The layer's own state is its int32 index tables ``idx_a [1, r, l_a]``,
    ``idx_b [1, r, l_b]`` (buffers). The adapter runs in the dtype of the base output
    (bf16 under autocast) while the pools stay fp32; gradients reach the pools through the
    fused pool-gradient op.
    """

    def __init__(self, base: nn.Module, pools: ShardPools, idx_a: torch.Tensor, idx_b: torch.Tensor,
                 scale: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.base_kind = base_dims(base)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "_pools", pools)  # shared, owned by the model
        self.register_buffer("idx_a", idx_a.reshape(1, *idx_a.shape[-2:]).to(torch.int32).contiguous())
        self.register_buffer("idx_b", idx_b.reshape(1, *idx_b.shape[-2:]).to(torch.int32).contiguous())
        self.register_buffer("scale", torch.tensor([float(scale)], dtype=torch.float32), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disable_adapter = False

    @property
    def pools(self) -> ShardPools:
        return self._pools

    @property
    def r(self) -> int:
        return self.idx_a.shape[1]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale.item():g}, merged={self.merged}"

    # ------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution ``scale * B A x`` for x [..., in] in x's dtype."""
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.in_features)
        if xs.shape[-1] > 1 and xs.stride(-1) != 1:
            xs = xs.contiguous()
        ip, tn = single_segment(xs.shape[0], xs.device)
        pools = self._pools
        d = ops.sharded_lora(xs, pools.A, pools.B, self.idx_a, self.idx_b, self.scale, ip, tn)
        return d.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.merged or self.disable_adapter:
            return out
        act = out.dtype if out.is_floating_point() else x.dtype
        return out + self.delta(self.dropout(x).to(act))

    # ------------------------------------------------------------------
    def delta_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``scale * B A`` as an [out, in] matrix (the merge update)."""
        pools = self._pools
        a = ops.gather_shards(pools.A.detach(), self.idx_a[0]).to(torch.float32)  # [r, in]
        bt = ops.gather_shards(pools.B.detach(), self.idx_b[0]).to(torch.float32)  # [r, out]
        return (self.scale.item() * (bt.T @ a)).to(dtype)

    @torch.no_grad()
    def _apply_delta(self, sign: float):
        dw = sign * self.delta_weight()
        if self.base_kind == "bnb":
            _bnb_add_(self.base, dw)
        elif self.base_kind == "conv1d":
            w = self.base.weight
            w.copy_((w.float() + dw.T.to(w.device)).to(w.dtype))
        else:
            w = self.base.weight
            w.copy_((w.float() + dw.to(w.device)).to(w.dtype))

    def merge(self):
        """Fold the adapter into the base weight (dequantize/requantize for bnb bases)."""
        if not self.merged:
            self._apply_delta(+1.0)
            self.merged = True

    def unmerge(self):
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False


def _bnb_add_(layer: nn.Module, dw: torch.Tensor):
    """weight += dw for a bitsandbytes layer: dequantize, add, requantize (as PEFT does)."""
    import bitsandbytes as bnb

    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        dense = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        new = (dense + dw.to(dense.device)).to(torch.float32)
        kwargs = {k: getattr(w, k) for k in ("requires_grad", "blocksize", "compress_statistics", "quant_type",
                                              "quant_storage") if hasattr(w, k)}
        kwargs["requires_grad"] = False
        layer.weight = bnb.nn.Params4bit(new.to("cpu"), **kwargs).to(w.device)
    elif w.dtype != torch.int8:  # Linear8bitLt with has_fp16_weights=True keeps a float weight
        w.data.copy_((w.float() + dw.to(w.device)).to(w.dtype))
    else:  # Linear8bitLt: int8 rows with one absmax scale each (after a forward, bnb keeps them in layer.state)
        scb = layer.state.SCB if layer.state.SCB is not None else w.SCB
        dense = bnb.functional.int8_vectorwise_dequant(w.data, scb).float()
        new = dense + dw.to(dense.device)
        layer.weight = bnb.nn.Int8Params(new.to("cpu"), requires_grad=False, has_fp16_weights=False).to(w.device)
        layer.state.CB = None  # the next forward takes the new CB/SCB from the weight
        layer.state.SCB = None
