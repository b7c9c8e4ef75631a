"""MoSLinear: a PEFT tuner layer whose adapters are read from pools shared across layers.

The pools belong to the tuner (:class:`mos_ext.model.MoSModel`, one pair per projection type and
adapter); a layer holds, per adapter, its int32 index tables ``mos_idx_a[name] [1, r, l_a]``,
``mos_idx_b[name] [1, r, l_b]`` (saved with the adapter) and a reference to its pools.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
from torch import nn

from . import ops
from .bases import base_dims
from .batch import single_segment
from .settings import deterministic_grads
from ._peft import BaseTunerLayer, BufferDict

class MoSLinear(nn.Module, BaseTunerLayer):
    """``y = base(x) + Σ_active scale · B (A dropout(x))`` with ``A``, ``B`` gathered from shared pools.

    The adapter runs in the dtype of the base output (bf16 under autocast); pools may be fp32
    masters (PEFT's ``autocast_adapter_dtype``) or in the activation dtype; gradients reach the
    pools through the fused pool-gradient op.
    """

    # PEFT toggles requires_grad on the "adapter layers"; the trainable pools live on the tuner, the
    # int32 tables cannot require grad, so only the (parameter-free) dropouts are listed there.
    adapter_layer_names = ("mos_dropout",)
    other_param_names = ("mos_idx_a", "mos_idx_b", "mos_scale", "mos_r", "_mos_pools")
    # set by mos_ext.multi_train.JointTraining while several adapters train in one batch: it then
    # gives every row its own adapter's delta (one sharded_lora over the stacked tenants)
    _mos_joint = None

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.base_kind = base_dims(base_layer)
        self.mos_idx_a = BufferDict({}, persistent=True)
        self.mos_idx_b = BufferDict({}, persistent=True)
        self.mos_dropout = nn.ModuleDict({})
        self.mos_scale: Dict[str, float] = {}
        self.mos_r: Dict[str, int] = {}
        self._mos_pools: Dict[str, tuple] = {}  # name -> (pool bank, type); pools looked up per call
        self._scale_t: Dict[tuple, torch.Tensor] = {}
        self.mos_deterministic: Dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # tables that arrive through load_state_dict (any loader) are checked once here, never per call
        self.register_load_state_dict_post_hook(lambda module, keys: _validate_loaded(module))

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, bank: "MoSPoolBank", ptype: str,
                     idx_a: torch.Tensor, idx_b: torch.Tensor, scale: float, dropout: float,
                     deterministic: bool = False) -> None:
        dev = self._base_device()
        self.mos_idx_a[adapter_name] = idx_a.reshape(1, *idx_a.shape[-2:]).to(device=dev, dtype=torch.int32).contiguous()
        self.mos_idx_b[adapter_name] = idx_b.reshape(1, *idx_b.shape[-2:]).to(device=dev, dtype=torch.int32).contiguous()
        self.mos_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mos_scale[adapter_name] = float(scale)
        self.mos_r[adapter_name] = int(idx_a.shape[-2])
        self._mos_pools[adapter_name] = (bank, ptype)
        self.mos_deterministic[adapter_name] = bool(deterministic)
        self._scale_t = {}
        self.set_adapter(self.active_adapters)

    def _base_device(self):
        for t in list(self.base_layer.parameters()) + list(self.base_layer.buffers()):
            if t.device.type != "meta":
                return t.device
        return torch.device("cpu")

    def pools(self, adapter_name: str):
        """(pool A, pool B) of one adapter: the shared tensors, owned by the model's pool bank."""
        bank, t = self._mos_pools[adapter_name]
        return bank.get(adapter_name, t)

    def _scale_tensor(self, adapter_name: str, device) -> torch.Tensor:
        key = (adapter_name, device)
        t = self._scale_t.get(key)
        if t is None:
            t = torch.tensor([self.mos_scale[adapter_name]], dtype=torch.float32, device=device)
            self._scale_t[key] = t
        return t

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{a}: r={r}, scale={self.mos_scale[a]:g}" for a, r in self.mos_r.items())
        return f"in={self.in_features}, out={self.out_features}, {ranks}"

    def validate_tables(self, adapter_name: Optional[str] = None, path: str = "") -> int:
        """Check this layer's tables (of one adapter, or all) against the rows of the pools they index
        (:func:`mos_ext.ops.validate_tables`, no gradient taps); returns the number of tables checked."""
        n = 0
        for name in list(self.mos_idx_a.keys()):
            if adapter_name is not None and name != adapter_name:
                continue
            pa, pb = self.pools(name)
            ops.validate_tables(self.mos_idx_a[name], pa.shape[0], name=f"{path}.mos_idx_a[{name!r}]")
            ops.validate_tables(self.mos_idx_b[name], pb.shape[0], name=f"{path}.mos_idx_b[{name!r}]")
            n += 2
        return n

    def lora_matrices(self, adapter_name: str):
        """``(A [r, in], Bᵀ [r, out])`` of one adapter, materialized in float32 (detached)."""
        pa, pb = self.pools(adapter_name)
        a = ops.gather_shards(pa.detach(), self.mos_idx_a[adapter_name][0]).to(torch.float32)
        bt = ops.gather_shards(pb.detach(), self.mos_idx_b[adapter_name][0]).to(torch.float32)
        return a, bt

    # ------------------------------------------------------------------ forward
    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``scale · B A x`` of one adapter for x [..., in], in x's dtype (pools converted on load)."""
        lead = x.shape[:-1]
        bank, t = self._mos_pools[adapter_name]
        # the pools through the bank's gradient taps: every layer's pool gradient of this forward pass
        # accumulates into one fp32 buffer per pool (no pool-sized zero tensor per layer)
        pa, pb = bank.grad_taps.take((id(self), adapter_name), *bank.get(adapter_name, t))
        act = x.dtype
        ok = (act, torch.float32)
        if pa.dtype not in ok or pb.dtype not in ok:  # e.g. fp16 pools under bf16 activations: compute in the pools'
            x = x.to(pa.dtype)                        # dtype and cast back, as PEFT does for LoRA
            if pb.dtype != pa.dtype:
                pb = pb.to(pa.dtype)
        xs = x.reshape(-1, self.in_features)
        if xs.shape[-1] > 1 and xs.stride(-1) != 1:
            xs = xs.contiguous()
        ip, tn = single_segment(xs.shape[0], xs.device).args()
        # MoSConfig.deterministic: held on through this call, so its backward is deterministic too
        det = self.mos_deterministic.get(adapter_name, False)
        with deterministic_grads(True) if det else contextlib.nullcontext():
            d = ops.sharded_lora(xs, pa, pb, self.mos_idx_a[adapter_name], self.mos_idx_b[adapter_name],
                                 self._scale_tensor(adapter_name, xs.device), ip, tn)
        return d.reshape(*lead, self.out_features).to(act)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        act = out.dtype if out.is_floating_point() else x.dtype
        if self._mos_joint is not None:
            return out + self._mos_joint.layer_delta(self, x.to(act), act)
        for name in self.active_adapters:
            if name not in self.mos_idx_a:
                continue
            out = out + self.delta(self.mos_dropout[name](x).to(act), name)
        return out

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self, adapter_name: str, dtype=torch.float32) -> torch.Tensor:
        """``scale · B A`` as an [out, in] matrix (the merge update) in ``dtype``."""
        a, bt = self.lora_matrices(adapter_name)  # [r, in], [r, out]
        return (self.mos_scale[adapter_name] * (bt.T @ a)).to(dtype)

    @torch.no_grad()
    def _apply_delta(self, dw: torch.Tensor, safe: bool = False):
        base = self.base_layer
        if self.base_kind == "bnb":
            _bnb_add_(base, dw)
            return
        w = base.weight
        upd = dw.T if self.base_kind == "conv1d" else dw
        new = (w.float() + upd.to(w.device)).to(w.dtype)
        if safe and not torch.isfinite(new).all():
            raise ValueError("NaNs/Infs in the merged weights: the adapter seems to be broken")
        w.copy_(new)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Fold the active (or named) adapters into the base weight (dequantize/requantize for bnb)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name in self.mos_idx_a and name not in self.merged_adapters:
                self._apply_delta(self.get_delta_weight(name), safe=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mos_idx_a:
                self._apply_delta(-self.get_delta_weight(name))


class MoSPoolBank(nn.Module, BaseTunerLayer):
    """The shared pools of every adapter, registered once on the adapted model as ``shard_pools``.

    Per projection type ``t`` and adapter: ``mos_A_<t>[adapter]``, ``mos_B_<t>[adapter]`` (trainable
    ParameterDicts); MiSS's frozen identity A pool is a buffer in ``mos_Afrozen_<t>[adapter]``.
    It is a PEFT tuner layer without a base layer, so that PEFT saves, loads, casts
    (``autocast_adapter_dtype``) and toggles ``requires_grad`` of the pools like any adapter
    weight, and so that transformers' ``load_adapter`` (which keeps no tuner object) still holds them.
    """

    def __init__(self):
        super().__init__()
        self.adapter_layer_names = ()
        self.other_param_names = ()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = "default"
        self.grad_taps = ops.PoolGradTaps()

    def _container(self, name: str, kind):
        if not hasattr(self, name):
            self.add_module(name, kind())
            if kind is nn.ParameterDict:
                self.adapter_layer_names = self.adapter_layer_names + (name,)
            else:
                self.other_param_names = self.other_param_names + (name,)
        return getattr(self, name)

    def add(self, adapter_name: str, t: str, a: torch.Tensor, b: torch.Tensor, a_frozen: bool) -> None:
        if a_frozen:
            self._container(f"mos_Afrozen_{t}", lambda: BufferDict({}, persistent=True))[adapter_name] = a
        else:
            self._container(f"mos_A_{t}", nn.ParameterDict)[adapter_name] = nn.Parameter(a)
        self._container(f"mos_B_{t}", nn.ParameterDict)[adapter_name] = nn.Parameter(b)

    def get(self, adapter_name: str, t: str):
        fa = getattr(self, f"mos_Afrozen_{t}", None)
        a = fa[adapter_name] if fa is not None and adapter_name in fa else getattr(self, f"mos_A_{t}")[adapter_name]
        return a, getattr(self, f"mos_B_{t}")[adapter_name]

    def items(self, adapter_name: str):
        """(name, pool) of one adapter, in registration order."""
        for name in self.adapter_layer_names + self.other_param_names:
            d = getattr(self, name)
            if adapter_name in d:
                yield name, d[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:  # the pools have no base weight
        return None

    def unmerge(self) -> None:
        return None

    def forward(self, *args, **kwargs):
        raise RuntimeError("MoSPoolBank holds pools; it is not called")


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


def _validate_loaded(module: "MoSLinear") -> None:
    if module._mos_pools:
        module.validate_tables()
