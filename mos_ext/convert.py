"""Conversions around the PEFT path: the short spelling, importing other adapters, exporting a LoRA.

    model = mos_ext.get_mos_model(hf_model, MoSConfig(...))    # = peft.get_peft_model(hf_model, cfg)
    model = mos_ext.import_adapter(hf_model, "lora_dir")        # PEFT LoRA / MiSS / format 1 -> trainable MoS
    mos_ext.export_lora(model, "lora_dir")                       # materialized PEFT LoRA

A MoS adapter saved by ``save_pretrained`` (format 2) is a PEFT adapter: ``peft.PeftModel.from_pretrained``
loads it (``is_trainable=True`` to train on).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from .adapter_io import adapter_kind, read_adapter
from .bases import layer_dims
from .config import MoSConfig
from .model import MoSModel


def get_mos_model(model: nn.Module, cfg: MoSConfig, adapter_name: str = "default", **kwargs):
    """``peft.get_peft_model(model, cfg)``: freeze ``model`` and inject a sharded adapter."""
    import peft

    if not isinstance(cfg, MoSConfig):
        raise TypeError(f"cfg must be a mos_ext.MoSConfig, got {type(cfg).__name__}")
    return peft.get_peft_model(model, cfg, adapter_name=adapter_name, **kwargs)


def _tuner(model) -> MoSModel:
    if isinstance(model, MoSModel):
        return model
    inner = getattr(model, "base_model", None)
    if isinstance(inner, MoSModel):
        return inner
    raise TypeError(f"expected a peft.PeftModel holding a MoS adapter, got {type(model).__name__}")


def import_adapter(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = True, **kwargs):
    """Turn another kind of adapter into a MoS ``PeftModel`` on ``model`` (trainable by default).

    Reads a PEFT LoRA directory (as ``method="lora"``), a PEFT MiSS directory (``method="miss"`` /
    ``"miss_mini"``) or a format-1 mos_ext directory with :func:`mos_ext.read_adapter`, then puts its
    pools and tables into a fresh MoS adapter; logits equal the source adapter's. Everything is read
    and validated before ``model`` is touched. A format-2 MoS directory is refused: it is PEFT's
    own format, loaded by ``peft.PeftModel.from_pretrained(model, path, is_trainable=True)``.
    """
    import peft

    path = os.fspath(path)
    if adapter_kind(path) == "mos":
        raise ValueError(f"{path} is a MoS adapter saved by save_pretrained: load it with "
                         f"peft.PeftModel.from_pretrained(model, path, is_trainable=True)")
    dims = layer_dims(model)
    spec = read_adapter(path, dims=dims)
    if spec.config is not None:
        cfg = MoSConfig(**{**dataclasses.asdict(spec.config), "type_layers": None})
    else:
        cfg = MoSConfig(method=spec.kind, r=spec.rank, lora_alpha=spec.scale * spec.rank,
                        mini_r=(spec.layers[next(iter(spec.layers))][1].pool.shape[1] if spec.kind == "miss_mini" else None),
                        target_modules=sorted(spec.layers))
    cfg.inference_mode = not is_trainable
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
                src, idx = spec.stack(paths, col)  # this type's distinct source pools, in layer order, stacked
                if tuple(src.shape) != tuple(pool.shape):
                    tuner.unload()
                    raise ValueError(f"adapter at {path}: {t} pool {side} is {tuple(src.shape)}, a MoS adapter of this "
                                     f"config has {tuple(pool.shape)}")
                pool.copy_(src.to(pool.dtype))
                for p in paths:
                    lay = tuner.model.get_submodule(p)
                    buf = lay.mos_idx_a if side == "A" else lay.mos_idx_b
                    buf[adapter_name].copy_(idx[p].to(torch.int32).reshape(buf[adapter_name].shape))
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
        a, bt = layer.lora_matrices(adapter_name)  # [r, in], [r, out]
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
