"""Functions around the PEFT path: the short spelling, import of other adapters, export.

    model = mos_ext.get_mos_model(hf_model, MoSConfig(...))    # = peft.get_peft_model(hf_model, cfg)
    model = mos_ext.load_adapter(hf_model, "dir")               # any adapter read_adapter reads, trainable
    mos_ext.export_lora(model, "lora_dir")                       # materialized PEFT LoRA
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .adapter_io import read_adapter
from .config import MoSConfig
from .layers import MoSLinear, base_dims


def get_mos_model(model: nn.Module, cfg: MoSConfig, adapter_name: str = "default", **kwargs):
    """``peft.get_peft_model(model, cfg)``: freeze ``model`` and inject a sharded adapter."""
    import peft

    if not isinstance(cfg, MoSConfig):
        raise TypeError(f"cfg must be a mos_ext.MoSConfig, got {type(cfg).__name__}")
    return peft.get_peft_model(model, cfg, adapter_name=adapter_name, **kwargs)


def _tuner(model):
    from .model import MoSModel

    if isinstance(model, MoSModel):
        return model
    inner = getattr(model, "base_model", None)
    if isinstance(inner, MoSModel):
        return inner
    raise TypeError(f"expected a peft.PeftModel holding a MoS adapter, got {type(model).__name__}")


def _layer_dims(model: nn.Module):
    dims = {}
    for n, m in model.named_modules():
        base = m.get_base_layer() if isinstance(m, MoSLinear) else m
        try:
            h, o, _ = base_dims(base)
        except TypeError:
            continue
        dims[n] = (h, o)
    return dims


def load_adapter(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = True, **kwargs):
    """Load any adapter mos_ext reads onto ``model`` as a trainable (or frozen) MoS ``PeftModel``.

    * a format-2 mos_ext directory: ``peft.PeftModel.from_pretrained`` (PEFT's own path);
    * a format-1 mos_ext directory, a PEFT LoRA (as ``method="lora"``) or a PEFT MiSS directory
      (as ``method="miss"`` / ``"miss_mini"``): read by :func:`mos_ext.read_adapter`, then the
      pools and tables are put into a fresh MoS adapter; logits equal the source adapter's.
    Everything is read and validated before ``model`` is touched.
    """
    import peft

    path = os.fspath(path)
    cfg_path = os.path.join(path, "adapter_config.json")
    if os.path.isfile(cfg_path):
        try:
            meta = json.load(open(cfg_path))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        if isinstance(meta, dict) and str(meta.get("peft_type") or "").upper() == "MOS":
            # PEFT's loader validates the whole directory (MoSConfig.from_pretrained -> read_adapter) and
            # MoSModel refuses other layer sizes before creating anything: the model stays untouched
            return peft.PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                                  **kwargs)
    spec = read_adapter(path, dims=_layer_dims(model))
    if spec.config is not None:
        cfg = spec.config
        cfg.type_layers = None
    else:
        cfg = MoSConfig(method=spec.kind, r=spec.rank, lora_alpha=spec.scale * spec.rank,
                        mini_r=(spec.layers[next(iter(spec.layers))][1].pool.shape[1] if spec.kind == "miss_mini" else None),
                        target_modules=sorted(spec.layers))
    cfg.inference_mode = not is_trainable
    # dry run on a meta copy is not possible for arbitrary models: check targets against the spec first
    dims = _layer_dims(model)
    missing = [p for p in spec.layers if p not in dims]
    if missing:
        raise ValueError(f"adapter at {path} adapts modules the model does not have: {missing[:3]}")
    pm = peft.get_peft_model(model, cfg, adapter_name=adapter_name, **kwargs)
    tuner = _tuner(pm)
    types = tuner.peft_config[adapter_name].type_layers
    got = sorted(p for ps in types.values() for p in ps)
    if got != sorted(spec.layers):
        tuner.unload()
        raise ValueError(f"adapter at {path}: it adapts {len(spec.layers)} layers, MoS targets {len(got)} with the same "
                         f"names; per-layer subsets (layers_to_transform) are not supported for continued training")
    with torch.no_grad():
        for t, paths in types.items():
            for side, col in (("A", 0), ("B", 1)):
                pool = tuner.pool_bank().get(adapter_name, t)[col]
                # this type's pools in the source: its distinct pool tensors, in layer order, stacked
                order, parts, off = {}, [], 0
                for p in paths:
                    sd = spec.layers[p][col]
                    if id(sd.pool) not in order:
                        order[id(sd.pool)] = off
                        parts.append(sd.pool)
                        off += sd.pool.shape[0]
                src = torch.cat([q.to(torch.float32) for q in parts])
                if tuple(src.shape) != tuple(pool.shape):
                    tuner.unload()
                    raise ValueError(f"adapter at {path}: {t} pool {side} is {tuple(src.shape)}, a MoS adapter of this "
                                     f"config has {tuple(pool.shape)}")
                pool.copy_(src.to(pool.dtype))
                for p in paths:
                    sd = spec.layers[p][col]
                    idx = torch.where(sd.idx >= 0, sd.idx + order[id(sd.pool)], sd.idx).to(torch.int32)
                    lay = tuner.model.get_submodule(p)
                    buf = lay.mos_idx_a if side == "A" else lay.mos_idx_b
                    buf[adapter_name].copy_(idx.reshape(buf[adapter_name].shape))
    return pm


def export_lora(model, path: str, adapter_name: str = "default") -> None:
    """Write the adapter materialized as a rank-r LoRA in PEFT's format (loadable by
    ``peft.PeftModel.from_pretrained`` with logits equal to the MoS adapter's)."""
    from safetensors.torch import save_file

    tuner = _tuner(model)
    cfg = tuner.peft_config[adapter_name]
    os.makedirs(path, exist_ok=True)
    sd, fan_in_fan_out, targets = {}, False, set()
    for n, layer in tuner.mos_layers():
        if adapter_name not in layer.mos_idx_a:
            continue
        pa, pb = layer.pools(adapter_name)
        a = torch.ops.mos.gather_shards(pa.detach().float(), layer.mos_idx_a[adapter_name][0])  # [r, in]
        bt = torch.ops.mos.gather_shards(pb.detach().float(), layer.mos_idx_b[adapter_name][0])  # [r, out]
        sd[f"base_model.model.{n}.lora_A.weight"] = a.contiguous().cpu()
        sd[f"base_model.model.{n}.lora_B.weight"] = bt.T.contiguous().cpu()
        fan_in_fan_out = fan_in_fan_out or layer.base_kind == "conv1d"
        targets.add(n)
    save_file(sd, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_cfg = {
        "peft_type": "LORA", "task_type": None, "r": cfg.r,
        "lora_alpha": cfg.scale * cfg.r,  # PEFT scales by lora_alpha / r
        "lora_dropout": cfg.lora_dropout, "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": cfg.base_model_name_or_path, "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)
