"""MoSModel: the PEFT tuner of MoS / MiSS / LoRA-as-shards adapters.

After ``import mos_ext``, ``peft.get_peft_model(model, mos_ext.MoSConfig(...))`` returns a
``peft.PeftModel`` whose ``base_model`` is a :class:`MoSModel`. The shared pools are owned once,
by a :class:`~mos_ext.layers.MoSPoolBank` registered on the adapted model as ``shard_pools`` (per
type ``t`` and adapter: ``mos_A_<t>[adapter] [N_A, s_a]``, ``mos_B_<t>[adapter] [N_B, s_b]``;
MiSS's frozen identity in ``mos_Afrozen_<t>``); each targeted layer becomes a :class:`MoSLinear`
holding its int32 index tables. ``save_pretrained`` writes ``adapter_config.json`` (the MoSConfig,
with ``type_layers``: each type's module paths in pool order) and ``adapter_model.safetensors``:

    base_model.model.shard_pools.mos_A_<type>            [N_A, s_a]  pool dtype (fp32 by default)
    base_model.model.shard_pools.mos_B_<type>            [N_B, s_b]
    base_model.model.<module path>.mos_idx_a           [1, r, l_a] int32
    base_model.model.<module path>.mos_idx_b           [1, r, l_b] int32

i.e. the compressed size: pools + tables, never a materialized LoRA.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from ._peft import PREFIX, BaseTuner, peft_method
from .adapter_io import AdapterSpec, Side, read_adapter
from .bases import base_dims
from .config import EMBEDDING_NAMES, MoSConfig
from .layers import MoSLinear, MoSPoolBank
from .pools import init_pools, sample_tables


def _group_types(model: nn.Module, names: List[str]) -> "OrderedDict[str, List[str]]":
    """Projection type -> module paths, in module order.

    A type is a module's last name (``q_proj``); where layers of one name differ in shape
    (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``) the parent's name is prefixed (``attn_c_proj``).
    """
    by_last: "OrderedDict[str, List[str]]" = OrderedDict()
    for n in names:
        by_last.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    found: "OrderedDict[str, List[str]]" = OrderedDict()
    for last, group in by_last.items():
        shapes = {base_dims(_base(model.get_submodule(n)))[:2] for n in group}
        if len(shapes) == 1:
            found[last] = group
            continue
        for n in group:
            parts = n.split(".")
            parent = parts[-2] if len(parts) > 1 else ""
            found.setdefault(f"{parent}_{last}", []).append(n)
    return found


def _base(mod: nn.Module) -> nn.Module:
    return mod.get_base_layer() if isinstance(mod, MoSLinear) else mod


@peft_method(MoSConfig)  # registered with PEFT where the tuner is defined
class MoSModel(BaseTuner):
    """PEFT tuner: shared shard pools per projection type, MoSLinear layers holding index tables."""

    prefix = PREFIX
    tuner_layer_cls = MoSLinear
    target_module_mapping: dict = {}
    # The shared pools live on the adapted model (its shard_pools bank), not on the tuner object, so
    # transformers' load_adapter (inject_adapter_in_model) keeps them.
    uses_shared_state = False

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None, **kwargs):
        self._mos_plans: Dict[str, dict] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
                         **kwargs)

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M

            tm = M.get(model_config.get("model_type"))
            if tm is None:
                raise ValueError("Please specify target_modules in the MoSConfig")
            peft_config.target_modules = list(tm)
        source = getattr(peft_config, "mos_source", None)  # set by MoSConfig.from_pretrained
        if source is not None:
            # the whole directory is read and validated before any module changes; the layer sizes it
            # was saved for are checked against this model in _plan
            peft_config.saved_dims = dict(read_adapter(source).type_dims)
            peft_config.mos_source = None
        return peft_config

    def _plan(self, cfg: MoSConfig, adapter_name: str) -> dict:
        """Targets, pools and tables of one adapter, built once for the whole model (the pools'
        size depends on how many layers share them)."""
        plan = self._mos_plans.get(adapter_name)
        if plan is None:
            types = self._targets(cfg)
            dims = self._check_plan(cfg, types)  # every check before anything is created
            plan = self._create_pools(cfg, adapter_name, types, dims)
            self._mos_plans[adapter_name] = plan
        return plan

    def _targets(self, cfg: MoSConfig) -> "OrderedDict[str, List[str]]":
        """Projection type -> the module paths ``cfg`` targets, in pool order."""
        names = []
        for key, mod in self.model.named_modules():
            if not key or isinstance(mod, (nn.ModuleList, nn.ModuleDict)) or ".base_layer" in key or "._mos" in key:
                continue
            if any(isinstance(p, MoSLinear) for p in self._parents(key)):
                continue
            if self._check_target_module_exists(cfg, key):
                if key.rsplit(".", 1)[-1] in EMBEDDING_NAMES:
                    raise ValueError(f"target {key!r}: adapters on embeddings or lm_head are not supported by mos_ext "
                                     f"(they could not be read back or served)")
                base_dims(_base(mod))  # TypeError naming the unsupported layer kind
                names.append(key)
        if not names:
            raise ValueError(f"target_modules {cfg.target_modules} match no module of the model")
        types = _group_types(self.model, names)
        if isinstance(cfg.target_modules, list):  # pools are drawn in the order target_modules names the types
            rank = {n: i for i, n in enumerate(cfg.target_modules)}
            types = OrderedDict(sorted(types.items(), key=lambda kv: rank.get(kv[1][0].rsplit(".", 1)[-1], len(rank))))
        return types

    def _check_plan(self, cfg: MoSConfig, types) -> Dict[str, tuple]:
        """Refuse a plan the adapter cannot have (other layers or sizes than it was saved for, a layout
        the dims do not allow); returns each type's (first base layer, (in, out, kind))."""
        if cfg.type_layers is not None:
            saved = {t: list(v) for t, v in cfg.type_layers.items()}
            if saved != {t: list(v) for t, v in types.items()}:
                diff = sorted(set(saved) ^ set(types)) or [t for t in types if saved.get(t) != types[t]]
                raise ValueError(f"this adapter was trained on other layers: its types/layers {diff[:4]} differ from "
                                 f"what target_modules={cfg.target_modules} selects in this model (a MoSConfig "
                                 f"reused for another model architecture needs type_layers=None)")
        saved = getattr(cfg, "saved_dims", None) or {}
        firsts = {t: _base(self.model.get_submodule(group[0])) for t, group in types.items()}
        dims = {t: (firsts[t], base_dims(m)) for t, m in firsts.items()}
        for t, group in types.items():
            h, o, _ = dims[t][1]
            cfg.check_type(t, h, o, len(group))
            if t in saved and tuple(saved[t]) != (h, o):
                raise ValueError(f"this adapter was saved for {t} layers of in/out features {tuple(saved[t])}; this "
                                 f"model's {t} layers have {(h, o)}")
        return dims

    def _create_pools(self, cfg: MoSConfig, adapter_name: str, types, dims) -> dict:
        """Create the adapter's pools in the bank and draw every layer's tables."""
        params = list(self.model.parameters())
        some = next((p for p in params if p.device.type != "meta"), None)
        if some is not None:
            device = some.device
        elif params:  # a model built on meta: pools on meta too (shapes only)
            device = torch.device("meta")
        else:
            device = None
        bank = self.pool_bank(create=True)
        gen = torch.Generator().manual_seed(cfg.seed)
        plan = {"layers": {}, "types": types}
        for t, group in types.items():
            first, (h, o, kind) = dims[t]
            w = getattr(first, "weight", None)
            dtype = w.dtype if (kind != "bnb" and w is not None and w.is_floating_point()) else torch.float32
            a, b = init_pools(cfg, h, o, len(group), gen=gen, dtype=dtype, device=device)
            ia, ib = sample_tables(cfg, h, o, len(group), gen)
            bank.add(adapter_name, t, a, b, a_frozen=cfg.method in ("miss", "miss_mini"))
            for k, n in enumerate(group):
                plan["layers"][n] = (t, ia[k], ib[k])
        cfg.type_layers = {t: list(g) for t, g in types.items()}
        return plan

    def _parents(self, key: str):
        parts = key.split(".")
        for i in range(1, len(parts)):
            yield self.model.get_submodule(".".join(parts[:i]))

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key=None, **kwargs):
        if current_key is None:
            raise ValueError("current_key must be given")
        plan = self._plan(peft_config, adapter_name)
        if current_key not in plan["layers"]:
            raise ValueError(f"{current_key} was not planned as a target")
        t, ia, ib = plan["layers"][current_key]
        if isinstance(target, MoSLinear):
            new = target
        else:
            new = MoSLinear(target)
        new.update_layer(adapter_name, self.pool_bank(), t, ia, ib, peft_config.scale, peft_config.lora_dropout,
                         deterministic=peft_config.deterministic)
        if new is not target:
            self._replace_module(parent, target_name, new, target)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)

    def _replace_module(self, parent, child_name, new_module, child):
        setattr(parent, child_name, new_module)

    # ------------------------------------------------------------------ pools
    BANK = "shard_pools"

    def pool_bank(self, create: bool = False) -> Optional[MoSPoolBank]:
        """The model's one :class:`MoSPoolBank` (registered on the adapted model as ``shard_pools``)."""
        bank = getattr(self.model, self.BANK, None)
        if bank is None and create:
            bank = MoSPoolBank()
            self.model.add_module(self.BANK, bank)
        return bank

    def adapter_spec(self, adapter_name: str = "default") -> AdapterSpec:
        """One adapter as an :class:`~mos_ext.adapter_io.AdapterSpec` (pools detached, tables on the CPU),
        what :func:`mos_ext.read_adapter` returns for a model."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist (adapters: {list(self.peft_config)})")
        cfg = self.peft_config[adapter_name]
        layers = {}
        for t, paths in cfg.type_layers.items():
            pa, pb = (p.detach() for p in self.pool_bank().get(adapter_name, t))
            for p in paths:
                lay = self.model.get_submodule(p)
                layers[p] = (Side(pa, lay.mos_idx_a[adapter_name][0].cpu()), Side(pb, lay.mos_idx_b[adapter_name][0].cpu()))
        return AdapterSpec(kind=cfg.method, rank=cfg.r, scale=cfg.scale, layers=layers, config=cfg,
                           types={t: list(v) for t, v in cfg.type_layers.items()}, source="<model>")

    def pools(self, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
        """{``mos_A_<type>`` / ``mos_B_<type>`` / ``mos_Afrozen_<type>``: pool} of one adapter."""
        bank = self.pool_bank()
        return dict(bank.items(adapter_name)) if bank is not None else {}

    def _set_pool_grads(self):
        bank = self.pool_bank()
        if bank is None:
            return
        for name in bank.adapter_layer_names:
            for a, p in getattr(bank, name).items():
                cfg = self.peft_config.get(a)
                p.requires_grad_(cfg is not None and not cfg.inference_mode and a in self.active_adapters)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad = False
        self._set_pool_grads()

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"adapter {n!r} does not exist (adapters: {list(self.peft_config)})")
        for m in self.model.modules():
            if isinstance(m, (MoSLinear, MoSPoolBank)):
                if m.merged:
                    m.unmerge()
                m.set_adapter(adapter_name)
        self.active_adapter = adapter_name
        if inference_mode:
            for n in names:
                self.peft_config[n].inference_mode = True
        self._set_pool_grads()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's convention: with ``autocast_adapter_dtype`` the trainable weights are float32
        masters whatever the base dtype; without it they stay in the base dtype."""
        if not autocast_adapter_dtype:
            return
        bank = self.pool_bank()
        for name in (bank.adapter_layer_names if bank is not None else ()):
            d = getattr(bank, name)
            if adapter_name in d and d[adapter_name].dtype in (torch.float16, torch.bfloat16):
                d[adapter_name] = nn.Parameter(d[adapter_name].detach().float(), requires_grad=d[adapter_name].requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        for m in self.model.modules():
            if isinstance(m, MoSLinear) and adapter_name in m.merged_adapters:
                raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        del self.peft_config[adapter_name]
        for m in self.model.modules():
            if isinstance(m, (MoSLinear, MoSPoolBank)):
                m.delete_adapter(adapter_name)
        self._mos_plans.pop(adapter_name, None)
        left = [a for a in (self.active_adapters or []) if a != adapter_name]
        self.active_adapter = left if left else (list(self.peft_config)[:1] or [])
        self._set_pool_grads()

    # ------------------------------------------------------------------ merge / unload
    def mos_layers(self):
        """(module path, MoSLinear) of every adapted layer."""
        for n, m in self.model.named_modules():
            if isinstance(m, MoSLinear):
                yield n, m

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names=None):
        for n, m in list(self.mos_layers()):
            if merge:
                m.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            parent_name, _, leaf = n.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, leaf, m.get_base_layer())
        if self.pool_bank() is not None:
            delattr(self.model, self.BANK)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        """Merge the active (or named) adapters into the base weights and return the plain base model."""
        return self._unload(True, safe_merge, adapter_names)

    def unload(self):
        """Remove every adapter and return the base model unchanged."""
        return self._unload(False)

    def _check_merge_allowed(self):
        return None
