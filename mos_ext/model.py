"""MoSModel: a Hugging Face model with sharded adapters injected, saved at its compressed size.

    model = get_mos_model(hf_model, MoSConfig(r=16, equivalent_rank=8, shards_per_vector=4, private_rank=4))
    model.save_adapter("out/")                      # adapter_config.json + adapter.safetensors
    model2 = MoSModel.from_pretrained(hf_model2, "out/")
    model.merge(); model.unmerge(); base = model.merge_and_unload()
    model.export_lora("lora_out/")                   # PEFT LoRA on-disk format

On-disk format (``adapter.safetensors``):
    pools.<type>.A    [N_A, s_a]  pool dtype (fp32 by default)
    pools.<type>.B    [N_B, s_b]
    index.<module path>.A   [r, l_a] int32   (module path as in base_model.named_modules())
    index.<module path>.B   [r, l_b] int32
``adapter_config.json`` holds the MoSConfig, the format version and, per type, ``h``, ``o``
and the ordered list of its layers' module paths.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from .layers import MoSLinear, base_dims
from .pools import MoSConfig, ShardPools, sample_tables

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


def _find_targets(model: nn.Module, cfg: MoSConfig) -> "OrderedDict[str, List[str]]":
    """Projection type -> module paths of its targeted layers, in module order.

    A type is a module's last name (``q_proj``); where layers of one name differ in shape
    (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``) the parent's name is prefixed (``attn_c_proj``).
    """
    wanted = set(cfg.target_modules)
    by_name: "OrderedDict[str, List[str]]" = OrderedDict((t, []) for t in cfg.target_modules)
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in wanted and not isinstance(mod, (MoSLinear, nn.ModuleList, nn.ModuleDict)):
            if name.rsplit(".", 2)[-2:-1] == ["base"] and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), MoSLinear):
                continue
            base_dims(mod)  # raises TypeError for unsupported layer kinds
            by_name[last].append(name)
    missing = [t for t, names in by_name.items() if not names]
    if missing:
        seen = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ValueError(f"target_modules {missing} match no module of the model (its module names end with "
                         f"e.g. {seen[:16]})")
    found: "OrderedDict[str, List[str]]" = OrderedDict()
    for last, names in by_name.items():
        shapes = {base_dims(model.get_submodule(n))[:2] for n in names}
        if len(shapes) == 1:
            found[last] = names
            continue
        for n in names:
            parts = n.split(".")
            parent = parts[-2] if len(parts) > 1 else ""
            found.setdefault(f"{parent}_{last}", []).append(n)
    return found


def _set_module(root: nn.Module, path: str, new: nn.Module):
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


class MoSModel(nn.Module):
    """A base model with frozen weights and trainable shard pools (one pair per projection type)."""

    def __init__(self, model: nn.Module, cfg: MoSConfig, _tables: Optional[Dict[str, tuple]] = None,
                 _pools: Optional[Dict[str, ShardPools]] = None):
        super().__init__()
        self.config_mos = cfg
        targets = _find_targets(model, cfg)
        dims = {}
        for t, names in targets.items():  # all layers of a type share one shape (_find_targets)
            h, o, _ = base_dims(model.get_submodule(names[0]))
            cfg.check_type(t, h, o, len(names))
            dims[t] = (h, o)
        for p in model.parameters():
            p.requires_grad_(False)
        some = next(model.parameters(), None)
        device = some.device if some is not None else None
        gen = torch.Generator().manual_seed(cfg.seed)
        pools = nn.ModuleDict()
        tables = {}
        for t, names in targets.items():
            h, o = dims[t]
            if _pools is not None:
                pools[t] = _pools[t]
            else:
                pools[t] = ShardPools(cfg, h, o, len(names), gen=gen, device=device)
            if _tables is not None:
                tables[t] = _tables[t]
            else:
                tables[t] = sample_tables(cfg, h, o, len(names), gen)
        self.pools = pools
        self.layer_names = {t: list(names) for t, names in targets.items()}
        for t, names in targets.items():
            ia, ib = tables[t]
            for k, n in enumerate(names):
                base = model.get_submodule(n)
                dev = next(base.parameters(), some).device if some is not None else None
                layer = MoSLinear(base, pools[t], ia[k].to(dev), ib[k].to(dev), cfg.scale, cfg.lora_dropout)
                _set_module(model, n, layer)
        self.base_model = model

    # ---------------------------------------------------------------- pass-through
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def mos_layers(self):
        """(module path, MoSLinear) of every adapted layer, type by type in layer order."""
        for t, names in self.layer_names.items():
            for n in names:
                yield n, self.base_model.get_submodule(n)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---------------------------------------------------------------- merge
    def merge(self):
        for _, layer in self.mos_layers():
            layer.merge()

    def unmerge(self):
        for _, layer in self.mos_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge every adapter into its base weight and return the plain base model."""
        self.merge()
        for n, layer in list(self.mos_layers()):
            _set_module(self.base_model, n, layer.base)
        base = self.base_model
        self.layer_names = {}
        return base

    def set_adapter_enabled(self, enabled: bool):
        for _, layer in self.mos_layers():
            layer.disable_adapter = not enabled

    # ---------------------------------------------------------------- save / load
    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        sd = {}
        for t, pools in self.pools.items():
            sd[f"pools.{t}.A"] = pools.A.detach()
            sd[f"pools.{t}.B"] = pools.B.detach()
        for n, layer in self.mos_layers():
            sd[f"index.{n}.A"] = layer.idx_a[0]
            sd[f"index.{n}.B"] = layer.idx_b[0]
        return sd

    def adapter_metadata(self) -> dict:
        types = {}
        for t, names in self.layer_names.items():
            p = self.pools[t]
            types[t] = dict(h=p.h, o=p.o, layers=list(names))
        return dict(format="mos_ext", format_version=FORMAT_VERSION, config=self.config_mos.to_dict(), types=types)

    def save_adapter(self, path: str):
        """Write adapter_config.json and adapter.safetensors (pools + int32 tables only)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        sd = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(sd, os.path.join(path, WEIGHTS_NAME), metadata={"format": "mos_ext"})
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(self.adapter_metadata(), f, indent=2)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str) -> "MoSModel":
        """Inject the adapter saved at ``path`` into ``model``. Everything is validated first;
        on any error (missing/corrupt file, mismatched model) ``model`` is left untouched."""
        cfg, meta, pools, tables = read_adapter(path, model)
        return cls(model, cfg, _tables=tables, _pools=pools)

    def load_adapter(self, path: str):
        """Replace this model's pools and tables with a saved adapter of the same layout
        (validated first; on error nothing changes)."""
        cfg, meta, pools, tables = read_adapter(path, self.base_model, expect_layers=self.layer_names)
        for t in self.layer_names:
            if pools[t].A.shape != self.pools[t].A.shape or pools[t].B.shape != self.pools[t].B.shape:
                raise ValueError(f"adapter at {path}: pools of {t!r} are {tuple(pools[t].A.shape)}/"
                                 f"{tuple(pools[t].B.shape)}, this model has {tuple(self.pools[t].A.shape)}/"
                                 f"{tuple(self.pools[t].B.shape)}")
            if tables[t][0].shape[1:] != self.base_model.get_submodule(self.layer_names[t][0]).idx_a.shape[1:]:
                raise ValueError(f"adapter at {path}: tables of {t!r} have another rank/slot count")
        with torch.no_grad():
            for t, names in self.layer_names.items():
                self.pools[t].A.copy_(pools[t].A)
                self.pools[t].B.copy_(pools[t].B)
                for k, n in enumerate(names):
                    layer = self.base_model.get_submodule(n)
                    layer.idx_a.copy_(tables[t][0][k])
                    layer.idx_b.copy_(tables[t][1][k])
                    layer.scale.fill_(cfg.scale)
        self.config_mos = cfg

    # ---------------------------------------------------------------- export
    def export_lora(self, path: str):
        """Write the materialized rank-r LoRA in PEFT's on-disk format (loadable by
        ``peft.PeftModel.from_pretrained``): adapter_config.json + adapter_model.safetensors."""
        from safetensors.torch import save_file

        cfg = self.config_mos
        os.makedirs(path, exist_ok=True)
        sd = {}
        fan_in_fan_out = False
        for n, layer in self.mos_layers():
            a = torch.ops.mos.gather_shards(layer.pools.A.detach().float(), layer.idx_a[0])  # [r, in]
            bt = torch.ops.mos.gather_shards(layer.pools.B.detach().float(), layer.idx_b[0])  # [r, out]
            sd[f"base_model.model.{n}.lora_A.weight"] = a.contiguous().cpu()
            sd[f"base_model.model.{n}.lora_B.weight"] = bt.T.contiguous().cpu()
            fan_in_fan_out = fan_in_fan_out or layer.base_kind == "conv1d"
        save_file(sd, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_cfg = {
            "peft_type": "LORA",
            "task_type": None,
            "r": cfg.r,
            "lora_alpha": cfg.scale * cfg.r,  # PEFT scales by lora_alpha / r
            "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in self.mos_layers()}),
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "base_model_name_or_path": None,
            "inference_mode": True,
        }
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(peft_cfg, f, indent=2)


def get_mos_model(model: nn.Module, cfg: MoSConfig) -> MoSModel:
    """Freeze ``model`` and inject sharded adapters into its ``cfg.target_modules``."""
    return MoSModel(model, cfg)


# -------------------------------------------------------------------- reading adapters


def read_adapter(path: str, model: nn.Module, expect_layers=None):
    """Read and validate a saved adapter against ``model`` without changing anything.

    Returns (cfg, metadata, {type: ShardPools}, {type: (idx_a [L, r, l_a], idx_b [L, r, l_b])}).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, CONFIG_NAME)
    w_path = os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"adapter file missing: {p}")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt adapter config {cfg_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "mos_ext":
        raise ValueError(f"{cfg_path} is not a mos_ext adapter config (no \"format\": \"mos_ext\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {meta.get('format_version')} is not supported "
                         f"(this mos_ext reads {FORMAT_VERSION})")
    try:
        cfg = MoSConfig.from_dict(meta["config"])
        types = meta["types"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"corrupt adapter config {cfg_path}: {e!r}") from None
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"corrupt adapter weights {w_path}: {e}") from None

    expected_keys = set()
    pools, tables = {}, {}
    modules = dict(model.named_modules())
    for t, info in types.items():
        names = info["layers"]
        h, o = info["h"], info["o"]
        if expect_layers is not None and expect_layers.get(t) != names:
            raise ValueError(f"adapter at {path}: layers of {t!r} differ from this model's")
        for n in names:
            mod = modules.get(n)
            if mod is None:
                raise ValueError(f"adapter at {path}: module {n!r} does not exist in the model")
            target = mod.base if isinstance(mod, MoSLinear) else mod
            if expect_layers is None and isinstance(mod, MoSLinear):
                raise ValueError(f"module {n!r} already carries an adapter")
            hh, oo, _ = base_dims(target)
            if (hh, oo) != (h, o):
                raise ValueError(f"adapter at {path}: {n} is {hh}->{oo} in the model but {h}->{o} in the adapter")
        L = len(names)
        cfg.check_type(t, h, o, L)
        n_a, s_a, l_a, n_b, s_b, l_b = cfg.layout(h, o, L)
        ka, kb = f"pools.{t}.A", f"pools.{t}.B"
        for k, shape in ((ka, (n_a, s_a)), (kb, (n_b, s_b))):
            if k not in tensors:
                raise ValueError(f"adapter at {path}: tensor {k!r} missing")
            v = tensors[k]
            if not v.is_floating_point():
                raise ValueError(f"adapter at {path}: {k} must be floating point, got {v.dtype}")
            if tuple(v.shape) != shape:
                raise ValueError(f"adapter at {path}: {k} has shape {tuple(v.shape)}, expected {shape}")
            if not torch.isfinite(v).all():
                raise ValueError(f"adapter at {path}: {k} has non-finite values")
        ia, ib = [], []
        for n in names:
            for side, lst, shape, P in (("A", ia, (cfg.r, l_a), n_a), ("B", ib, (cfg.r, l_b), n_b)):
                k = f"index.{n}.{side}"
                if k not in tensors:
                    raise ValueError(f"adapter at {path}: tensor {k!r} missing")
                v = tensors[k]
                if v.dtype not in (torch.int32, torch.int16, torch.int64):
                    raise ValueError(f"adapter at {path}: {k} must be an integer table, got {v.dtype}")
                if tuple(v.shape) != shape:
                    raise ValueError(f"adapter at {path}: {k} has shape {tuple(v.shape)}, expected {shape}")
                if v.numel() and (int(v.min()) < -1 or int(v.max()) >= P):
                    raise ValueError(f"adapter at {path}: {k} has entries outside [-1, {P})")
                lst.append(v.to(torch.int32))
                expected_keys.add(k)
        expected_keys.update((ka, kb))
        sp = ShardPools(cfg, h, o, L, device="meta")
        pa, pb = tensors[ka], tensors[kb]
        sp.A = nn.Parameter(pa.float() if pa.dtype != torch.float32 else pa, requires_grad=sp.A.requires_grad)
        sp.B = nn.Parameter(pb.float() if pb.dtype != torch.float32 else pb)
        pools[t] = sp
        tables[t] = (torch.stack(ia), torch.stack(ib))
    if expect_layers is None:
        found = _find_targets(model, cfg)
        if set(found) != set(types):
            raise ValueError(f"adapter at {path}: it adapts types {sorted(types)} but the model's target modules "
                             f"form types {sorted(found)}")
        for t, names in found.items():
            if names != types[t]["layers"]:
                raise ValueError(f"adapter at {path}: the model's {t!r} layers {names[:3]}... do not match the "
                                 f"adapter's {types[t]['layers'][:3]}...")
    extra = set(tensors) - expected_keys
    if extra:
        raise ValueError(f"adapter at {path}: unexpected tensors {sorted(extra)[:5]}")
    # Place pools on the model's device.
    some = next(model.parameters(), None)
    if some is not None:
        for sp in pools.values():
            sp.to(some.device)
    return cfg, meta, pools, tables
