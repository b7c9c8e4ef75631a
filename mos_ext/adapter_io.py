"""The one adapter reader: every adapter directory or in-memory model mos_ext accepts becomes an
:class:`AdapterSpec` here, for serving (``AdapterStore.load``), for continued training
(``mos_ext.import_adapter``), for PEFT's loader (the tuner checks a directory before it changes a module)
and for the vLLM plugin. Nothing else parses adapter files (:func:`adapter_kind` tells the formats apart).
Needs no peft: configs are read as :class:`mos_ext.layout.MoSHyper`.

Accepted:
* mos_ext format 2 (``adapter_config.json`` with ``"peft_type": "MOS"`` + ``adapter_model.safetensors``),
  written by ``PeftModel.save_pretrained`` for MoS, MiSS and LoRA-as-shards;
* mos_ext format 1 (``"format": "mos_ext"`` + ``adapter.safetensors``), written before mos_ext
  became a PEFT method;
* PEFT LoRA (``"peft_type": "LORA"``) and PEFT MiSS (``"peft_type": "MISS"``) directories.

A part we cannot apply exactly is refused with a ``ValueError`` naming it (DoRA, ``lora_bias``,
embedding or ``lm_head`` LoRA, ``modules_to_save``, rank/alpha patterns, MiSS's ``bat``, ...):
never dropped.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .layout import EMBEDDING_NAMES, PEFT_CONFIG_FIELDS, MoSHyper

WEIGHTS_V2 = "adapter_model.safetensors"
WEIGHTS_V1 = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


@dataclass
class Side:
    """One adapter side of one layer in the adapter's own layout."""

    pool: torch.Tensor  # [P, s]
    idx: torch.Tensor  # [r, l] int (rows of pool, -1 = zero shard)


@dataclass
class AdapterSpec:
    """An adapter in a layout-neutral form: per module path its A and B sides, plus scale.

    Layers that share pools point at the same tensor objects. ``config`` is the
    :class:`~mos_ext.layout.MoSHyper` when the adapter is a mos_ext one (else None); ``types`` maps projection type -> module paths when known.
    """

    kind: str
    rank: int
    scale: float
    layers: Dict[str, Tuple[Side, Side]]
    config: Optional[object] = None
    types: Dict[str, List[str]] = field(default_factory=dict)
    source: str = ""
    # projection type -> (in_features, out_features) of its layers, when the format implies them
    type_dims: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    def stack(self, paths: List[str], col: int):
        """One side (``col`` 0: A, 1: B) of the layers ``paths`` over one row space: their distinct pools
        (by identity, in order of first use) concatenated as float32 on the CPU, and each layer's table
        offset into it. Returns ``(pool [P, s], {path: idx [r, l] int64})``."""
        offsets, parts, off = {}, [], 0
        for p in paths:
            pool = self.layers[p][col].pool
            if id(pool) not in offsets:
                offsets[id(pool)] = off
                parts.append(pool.detach().to("cpu", torch.float32))
                off += pool.shape[0]
        big = torch.cat(parts) if parts else torch.empty(0, 1)
        idx = {}
        for p in paths:
            sd = self.layers[p][col]
            t = sd.idx.long()
            idx[p] = torch.where(t >= 0, t + offsets[id(sd.pool)], t)
        return big, idx


# PEFT LoRA config keys that change what the adapter computes, which mos_ext does not apply.
_LORA_REFUSED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "rank_pattern": "rank_pattern (per-layer ranks)",
    "alpha_pattern": "alpha_pattern (per-layer alphas)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "arrow_config": "Arrow routing (arrow_config)",
}


def adapter_kind(path) -> Optional[str]:
    """The format of an adapter directory by its config alone: ``"mos"`` (format 2), ``"mos_v1"``,
    ``"lora"``, ``"miss"``, another PEFT type in lower case, or None when ``path`` holds no readable
    adapter config. Never raises; :func:`read_adapter` validates the contents."""
    try:
        with open(os.path.join(os.fspath(path), CONFIG_NAME)) as f:
            meta = json.load(f)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(meta, dict):
        return None
    if meta.get("format") == "mos_ext":
        return "mos_v1"
    ptype = str(meta.get("peft_type") or "").lower()
    return ptype or None


def _load_json(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not an adapter directory: no {CONFIG_NAME} (mos_ext reads mos_ext, PEFT "
                                f"LoRA and PEFT MiSS adapter directories)")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt adapter config {cfg_path}: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt adapter config {cfg_path}: not a JSON object")
    return meta


def _load_tensors(path: str, name: str) -> Dict[str, torch.Tensor]:
    """The adapter's tensors: ``name`` (safetensors) or, for PEFT's layout where only that
    exists, ``adapter_model.bin`` (``save_pretrained(safe_serialization=False)``), read as PEFT
    reads it, with ``torch.load(weights_only=True)``: tensors only, no code run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = os.path.join(path, name)
    pickled = os.path.join(path, "adapter_model.bin")
    if name == WEIGHTS_V2 and not os.path.isfile(f) and os.path.isfile(pickled):
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unpickling error of any kind means a corrupt file
            raise ValueError(f"corrupt adapter weights {pickled}: {type(e).__name__}: {e}") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise ValueError(f"corrupt adapter weights {pickled}: not a mapping of names to tensors")
        return tensors
    if not os.path.isfile(f):
        raise FileNotFoundError(f"adapter file missing: {f}")
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"corrupt adapter weights {f}: {e}") from None


def read_adapter(src, adapter_name: str = "default", dims: Optional[Dict[str, Tuple[int, int]]] = None) -> AdapterSpec:
    """Read ``src`` (a directory path, a ``peft.PeftModel`` / :class:`mos_ext.MoSModel` holding a
    MoS adapter, or an AdapterSpec) into an :class:`AdapterSpec`, validated; nothing is changed.

    ``dims``: module path -> (in_features, out_features) of the model it will be applied to; needed
    for PEFT MiSS directories (their A side is implied by the layer's in-features)."""
    if isinstance(src, AdapterSpec):
        _validate(src, src.source or "<spec>")
        return src
    if isinstance(src, torch.nn.Module):
        # a PeftModel forwards attribute lookups to its tuner: MoSModel.adapter_spec
        make = getattr(src, "adapter_spec", None)
        if not callable(make):
            raise TypeError(f"expected a peft.PeftModel with a MoS adapter, a mos_ext.MoSModel, an AdapterSpec or a "
                            f"directory, got {type(src).__name__}")
        spec = make(adapter_name)
        _validate(spec, "<model>")
        return spec
    path = os.fspath(src)
    meta = _load_json(path)
    ptype = str(meta.get("peft_type") or "").upper()
    if meta.get("format") == "mos_ext":
        spec = _spec_v1(path, meta)
    elif ptype == "MOS":
        spec = _spec_v2(path, meta)
    elif ptype == "LORA":
        spec = _spec_peft_lora(path, meta)
    elif ptype == "MISS":
        spec = _spec_peft_miss(path, meta)
    else:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: peft_type {meta.get('peft_type')!r} is not supported "
                         f"(mos_ext reads MOS, LORA and MISS adapters and its own format-1 directories)")
    spec.source = path
    if spec.kind in ("miss", "miss_mini") and isinstance(spec.config, dict):
        if dims is None:
            raise ValueError(f"PEFT MiSS adapter at {path}: reading it needs the model's layer dims")
        complete_miss(spec, dims)
    _validate(spec, path)
    if dims is not None:
        check_dims(spec, dims)
    return spec


def split_table(idx: torch.Tensor, k: int) -> torch.Tensor:
    """A table ``[..., l]`` into a pool of shard length ``s``, re-expressed for the same pool viewed as
    ``[P * k, s / k]`` (no copy): entry ``p`` becomes ``p*k, ..., p*k + k - 1``, a skipped entry
    (``< 0``) ``k`` entries ``-1``. Returns ``[..., l * k]`` in ``idx``'s dtype."""
    if k == 1:
        return idx
    ids = idx.unsqueeze(-1) * k + torch.arange(k, dtype=idx.dtype, device=idx.device)
    ids = torch.where(idx.unsqueeze(-1) >= 0, ids, torch.full_like(ids, -1))
    return ids.reshape(*idx.shape[:-1], idx.shape[-1] * k)


def check_dims(spec: AdapterSpec, dims: Dict[str, Tuple[int, int]]) -> None:
    """Refuse ``spec`` for a model whose layers (module path -> (in_features, out_features)) are
    missing or of other sizes than the adapter was saved for, naming both."""
    for t, paths in (spec.types or {p: [p] for p in spec.layers}).items():
        want = spec.type_dims.get(t)
        for p in paths:
            if p not in dims:
                raise ValueError(f"adapter at {spec.source}: it adapts {p!r}, which is not an adaptable layer of the "
                                 f"model")
            if want is None:  # PEFT LoRA: dims from the matrices
                sa, sb = spec.layers[p]
                if sa.idx is None or sb.idx is None:
                    continue
                want_p = (sa.pool.shape[1] * sa.idx.shape[1], sb.pool.shape[1] * sb.idx.shape[1])
            else:
                want_p = want
            if tuple(dims[p]) != tuple(want_p):
                raise ValueError(f"adapter at {spec.source}: layer {p} of the model has in/out features "
                                 f"{tuple(dims[p])}, the adapter was saved for {tuple(want_p)}")


def _validate(spec: AdapterSpec, where: str):
    if not spec.layers:
        raise ValueError(f"adapter at {where} adapts no layer")
    if not math.isfinite(spec.scale):  # the ops do not check scale values (a device read on CUDA)
        raise ValueError(f"adapter at {where}: its scale (lora_alpha / r) is {spec.scale}, not finite")
    for path, sides in spec.layers.items():
        for side, sd in zip("AB", sides):
            if sd.idx.dtype not in (torch.int16, torch.int32, torch.int64):
                raise ValueError(f"adapter at {where}: {path} table {side} must be integers, got {sd.idx.dtype}")
            if sd.idx.dim() != 2 or sd.idx.shape[0] != spec.rank:
                raise ValueError(f"adapter at {where}: {path} table {side} has shape {tuple(sd.idx.shape)}, expected "
                                 f"[{spec.rank}, l]")
            if sd.idx.numel() and (int(sd.idx.min()) < -1 or int(sd.idx.max()) >= sd.pool.shape[0]):
                raise ValueError(f"adapter at {where}: {path} table {side} has entries outside [-1, {sd.pool.shape[0]})")
            if sd.pool.dim() != 2 or not sd.pool.is_floating_point():
                raise ValueError(f"adapter at {where}: {path} pool {side} must be a 2-D floating-point tensor")
            if not torch.isfinite(sd.pool).all():
                raise ValueError(f"adapter at {where}: {path} pool {side} has non-finite values")


def _check_used(tensors: dict, used: set, where: str):
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"adapter at {where}: tensors this reader cannot apply: {extra[:5]} (refused rather than "
                         f"dropped)")


# ---------------------------------------------------------------------------- mos_ext formats
def _mos_config(d: dict, where: str) -> MoSHyper:
    try:
        return MoSHyper.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter config at {where}: {e}") from None


def _spec_v2(path: str, meta: dict) -> AdapterSpec:
    import dataclasses

    names = {f.name for f in dataclasses.fields(MoSHyper)}
    unknown = sorted(set(meta) - names - set(PEFT_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"adapter config at {path}: fields {unknown} are unknown to this mos_ext (a newer format?)")
    cfg = _mos_config({k: v for k, v in meta.items() if k in names}, path)
    if not cfg.type_layers:
        raise ValueError(f"adapter config at {path}: type_layers is missing")
    tensors = _load_tensors(path, WEIGHTS_V2)
    layers, used, type_dims = {}, set(), {}
    for t, paths in cfg.type_layers.items():
        pools = []
        for side in ("A", "B"):
            cands = [f"base_model.model.shard_pools.mos_{side}_{t}", f"base_model.model.shard_pools.mos_{side}frozen_{t}"]
            k = next((c for c in cands if c in tensors), None)
            if k is None:
                raise ValueError(f"adapter at {path}: tensor {cands[0]!r} missing")
            pools.append(tensors[k])
            used.add(k)
        for p in paths:
            idx = []
            for side in "ab":
                k = f"base_model.model.{p}.mos_idx_{side}"
                if k not in tensors:
                    raise ValueError(f"adapter at {path}: tensor {k!r} missing")
                v = tensors[k]
                idx.append(v.reshape(v.shape[-2:]) if v.dim() == 3 and v.shape[0] == 1 else v)
                used.add(k)
            layers[p] = (Side(pools[0], idx[0]), Side(pools[1], idx[1]))
        type_dims[t] = _check_layout_v2(cfg, t, paths, layers, path)
    # PEFT < 0.19 saved every adapter's MoS tensors into each adapter's file, the others keyed with
    # their adapter name appended (".../mos_idx_a.other"); they are not part of this adapter and PEFT
    # itself does not load them: skip exactly those, refuse anything else.
    used.update(k for k in tensors if _OTHER_ADAPTER.match(k))
    _check_used(tensors, used, path)
    return AdapterSpec(kind=cfg.method, rank=cfg.r, scale=cfg.scale, layers=layers, config=cfg,
                       types={t: list(v) for t, v in cfg.type_layers.items()}, type_dims=type_dims)


_OTHER_ADAPTER = re.compile(r"^base_model\.model\.(shard_pools\.mos_(A|B|Afrozen)_[^.]+|.+\.mos_idx_[ab])\.[^.]+$")


def _check_layout_v2(cfg, t: str, paths: List[str], layers: dict, where: str) -> Tuple[int, int]:
    """A format-2 file does not store layer sizes: they follow from a pool's shard length times a
    table's shards per vector (in = s_a * l_a, out = s_b * l_b for every method). Check that the
    pools and tables are exactly what ``cfg.layout`` gives for those sizes and this many layers."""
    sa, sb = layers[paths[0]]
    for side, sd in (("A", sa), ("B", sb)):
        if sd.pool.dim() != 2 or sd.idx.dim() != 2:
            raise ValueError(f"adapter at {where}: {t} pool {side} {tuple(sd.pool.shape)} / table "
                             f"{tuple(sd.idx.shape)} must be 2-D (pool [rows, shard length], table [r, l])")
    h, o = sa.pool.shape[1] * sa.idx.shape[1], sb.pool.shape[1] * sb.idx.shape[1]
    try:
        cfg.check_type(t, h, o, len(paths))
    except ValueError as e:
        raise ValueError(f"adapter config at {where}: {e}") from None
    n_a, s_a, l_a, n_b, s_b, l_b = cfg.layout(h, o, len(paths))
    for side, sd, shape in (("A", sa, (n_a, s_a)), ("B", sb, (n_b, s_b))):
        if tuple(sd.pool.shape) != shape:
            raise ValueError(f"adapter at {where}: {t} pool {side} has shape {tuple(sd.pool.shape)}, expected {shape} "
                             f"for {len(paths)} layers of in/out features {(h, o)} under its config")
    for p in paths:
        for side, sd, l in (("a", layers[p][0], l_a), ("b", layers[p][1], l_b)):
            if tuple(sd.idx.shape) != (cfg.r, l):
                raise ValueError(f"adapter at {where}: {p}.mos_idx_{side} has shape {tuple(sd.idx.shape)}, expected "
                                 f"[1, {cfg.r}, {l}]")
    return h, o


def _spec_v1(path: str, meta: dict) -> AdapterSpec:
    if meta.get("format_version") != 1:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: mos_ext format_version {meta.get('format_version')} is "
                         f"not supported (this mos_ext reads 1 and 2)")
    try:
        cfg = _mos_config(dict(meta["config"]), path)
        types = {t: list(info["layers"]) for t, info in meta["types"].items()}
        dims = {t: (int(info["h"]), int(info["o"])) for t, info in meta["types"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"corrupt adapter config at {path}: {e!r}") from None
    tensors = _load_tensors(path, WEIGHTS_V1)
    layers, used = {}, set()
    for t, paths in types.items():
        h, o = dims[t]
        n_a, s_a, l_a, n_b, s_b, l_b = cfg.layout(h, o, len(paths))
        pools = []
        for side, shape in (("A", (n_a, s_a)), ("B", (n_b, s_b))):
            k = f"pools.{t}.{side}"
            if k not in tensors:
                raise ValueError(f"adapter at {path}: tensor {k!r} missing")
            if tuple(tensors[k].shape) != shape:
                raise ValueError(f"adapter at {path}: {k} has shape {tuple(tensors[k].shape)}, expected {shape}")
            pools.append(tensors[k])
            used.add(k)
        for p in paths:
            idx = []
            for side, l in (("A", l_a), ("B", l_b)):
                k = f"index.{p}.{side}"
                if k not in tensors:
                    raise ValueError(f"adapter at {path}: tensor {k!r} missing")
                if tuple(tensors[k].shape) != (cfg.r, l):
                    raise ValueError(f"adapter at {path}: {k} has shape {tuple(tensors[k].shape)}, expected {(cfg.r, l)}")
                idx.append(tensors[k])
                used.add(k)
            layers[p] = (Side(pools[0], idx[0]), Side(pools[1], idx[1]))
    _check_used(tensors, used, path)
    return AdapterSpec(kind=cfg.method, rank=cfg.r, scale=cfg.scale, layers=layers, config=cfg, types=types,
                       type_dims=dims)


# ---------------------------------------------------------------------------- PEFT formats
def _strip(key: str, suffix: str) -> str:
    mod = key[: -len(suffix)]
    return mod[len("base_model.model."):] if mod.startswith("base_model.model.") else mod


def _refuse_keys(meta: dict, table: dict, path: str, what: str):
    for k, name in table.items():
        v = meta.get(k)
        if v:  # None / False / {} / [] are the defaults
            raise ValueError(f"{what} adapter at {path}: {name} is not supported by mos_ext (refused rather than "
                             f"served or trained wrongly)")


def _refuse_embeddings(paths, path: str, what: str):
    for p in paths:
        last = p.rsplit(".", 1)[-1]
        if last in EMBEDDING_NAMES:
            raise ValueError(f"{what} adapter at {path}: an adapter on {p!r} (embedding or lm_head) is not supported "
                             f"by mos_ext")


def _spec_peft_lora(path: str, meta: dict) -> AdapterSpec:
    _refuse_keys(meta, _LORA_REFUSED, path, "PEFT LoRA")
    if meta.get("bias", "none") not in ("none", None):
        raise ValueError(f"PEFT LoRA adapter at {path}: bias={meta.get('bias')!r} (trained base biases) is not "
                         f"supported by mos_ext")
    try:
        r = int(meta["r"])
        alpha = float(meta.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt PEFT LoRA config at {path}: {e!r}") from None
    scale = alpha / (r ** 0.5) if meta.get("use_rslora") else alpha / r
    tensors = _load_tensors(path, WEIGHTS_V2)
    emb = [k for k in tensors if ".lora_embedding_" in k]
    if emb:
        raise ValueError(f"PEFT LoRA adapter at {path}: embedding LoRA ({emb[0]}) is not supported by mos_ext")
    layers, used = {}, set()
    rows = torch.arange(r, dtype=torch.long).reshape(r, 1)
    for k in sorted(tensors):
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k[: -len(".lora_A.weight")]
        bkey = mod + ".lora_B.weight"
        if bkey not in tensors:
            raise ValueError(f"PEFT LoRA adapter at {path}: {bkey} missing")
        a, b = tensors[k], tensors[bkey]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"PEFT LoRA adapter at {path}: {mod} has lora_A {tuple(a.shape)}, lora_B "
                             f"{tuple(b.shape)} for r={r} (per-layer ranks are not supported)")
        layers[_strip(k, ".lora_A.weight")] = (Side(a, rows), Side(b.T.contiguous(), rows))
        used.update((k, bkey))
    _refuse_embeddings(layers, path, "PEFT LoRA")
    _check_used(tensors, used, path)
    if not layers:
        raise ValueError(f"PEFT LoRA adapter at {path} holds no lora_A/lora_B weights")
    return AdapterSpec(kind="lora", rank=r, scale=scale, layers=layers)


def _spec_peft_miss(path: str, meta: dict) -> AdapterSpec:
    _refuse_keys(meta, {"modules_to_save": "modules_to_save (fully trained copies of modules)",
                        "rank_pattern": "rank_pattern"}, path, "PEFT MiSS")
    init = meta.get("init_weights", True)
    if init == "bat":
        raise ValueError(f"PEFT MiSS adapter at {path}: the 'bat' variant (init_weights='bat') depends on the base "
                         f"weight non-linearly and is not supported by mos_ext")
    if meta.get("bias", "none") not in ("none", None):
        raise ValueError(f"PEFT MiSS adapter at {path}: bias={meta.get('bias')!r} is not supported by mos_ext")
    try:
        r = int(meta["r"])
        mini_r = int(meta["mini_r"]) if init == "mini" else None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt PEFT MiSS config at {path}: {e!r}") from None
    tensors = _load_tensors(path, WEIGHTS_V2)
    eye = torch.eye(r)
    layers, used = {}, set()
    for k in sorted(tensors):
        if not k.endswith(".miss_block"):
            continue
        d = tensors[k]
        mod = _strip(k, ".miss_block")
        if d.dim() != 2 or d.shape[0] != r or (mini_r is not None and d.shape[1] != mini_r):
            raise ValueError(f"PEFT MiSS adapter at {path}: {mod} miss_block has shape {tuple(d.shape)}, expected "
                             f"[{r}, {'mini_r=' + str(mini_r) if mini_r else 'out_features'}]")
        layers[mod] = (Side(eye, None), Side(d, torch.arange(r, dtype=torch.long).reshape(r, 1)))
        used.add(k)
    _refuse_embeddings(layers, path, "PEFT MiSS")
    _check_used(tensors, used, path)
    if not layers:
        raise ValueError(f"PEFT MiSS adapter at {path} holds no miss_block weights")
    # A's table depends on the layer's in-features (h / r slots): filled in by complete_miss().
    return AdapterSpec(kind="miss_mini" if mini_r else "miss", rank=r, scale=1.0, layers=layers,
                       config={"mini_r": mini_r})


def complete_miss(spec: AdapterSpec, dims: Dict[str, Tuple[int, int]]) -> AdapterSpec:
    """Fill in a PEFT MiSS spec's tables from the model's layer dims: ``idx_a[j, i] = j`` over ``h / r``
    slots; MiSS mini's ``idx_b[j, i] = j`` over ``o / mini_r`` slots. Refuses ``h`` not divisible by r."""
    if spec.kind not in ("miss", "miss_mini") or not isinstance(spec.config, dict):
        return spec
    r = spec.rank
    for p, (sa, sb) in spec.layers.items():
        if p not in dims:
            raise ValueError(f"MiSS adapter at {spec.source}: module {p!r} is not an adaptable layer of the model")
        h, o = dims[p]
        if h % r:
            raise ValueError(f"MiSS adapter at {spec.source}: {p} has in_features {h} not divisible by r={r} (PEFT pads "
                             f"the input there; mos_ext does not support that case)")
        sa.idx = torch.arange(r, dtype=torch.long).reshape(r, 1).expand(r, h // r).contiguous()
        if spec.kind == "miss_mini":
            mini = sb.pool.shape[1]
            if o % mini:
                raise ValueError(f"MiSS adapter at {spec.source}: {p} out_features {o} not divisible by mini_r={mini}")
            sb.idx = torch.arange(r, dtype=torch.long).reshape(r, 1).expand(r, o // mini).contiguous()
        elif sb.pool.shape[1] != o:
            raise ValueError(f"MiSS adapter at {spec.source}: {p} miss_block has {sb.pool.shape[1]} columns, the "
                             f"layer has {o} out_features")
    spec.config = None
    return spec
