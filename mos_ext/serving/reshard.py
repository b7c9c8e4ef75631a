"""Re-sharding: an adapter in its own layout becomes rows of a store's pools and tables into them.

Pure functions of an :class:`~mos_ext.adapter_io.AdapterSpec` and a store's layout (served layers,
their dims, shards per row, max rank); :class:`~mos_ext.serving.AdapterStore` allocates rows and slots
for the result. Every adapter kind is converted into the store's shard length: MoS pools of shard
length ``k * s`` are split into ``k`` rows each, plain LoRA (``l = 1``) rows likewise, and shorter
shards (MiSS's identity, MiSS mini's ``D``) are joined into composite rows, deduplicated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import torch

from ..adapter_io import AdapterSpec, split_table
from ..ops import validate_tables

__all__ = ["StorePlan", "plan_adapter", "plan_layout"]


def _reshard(pool: torch.Tensor, idx: torch.Tensor, s_store: int):
    """Re-express (pool [P, s], idx [..., l]) with shard length s_store.

    Returns (rows [P', s_store], idx' [..., l * s // s_store]) where idx' indexes rows.
    """
    P, s = pool.shape
    lead = idx.shape[:-1]
    l = idx.shape[-1]
    if s == s_store:
        return pool, idx
    if s % s_store == 0:  # split every shard into k rows
        k = s // s_store
        return pool.reshape(P * k, s_store), split_table(idx, k)
    if s_store % s == 0:  # join m consecutive shards into one composite row (deduplicated)
        m = s_store // s
        if l % m:
            raise ValueError(f"cannot re-shard {l} slots of length {s} into rows of length {s_store}")
        tuples = idx.reshape(-1, m)
        uniq, inverse = torch.unique(tuples, dim=0, return_inverse=True)
        empty = (uniq < 0).all(dim=1)
        parts = pool[uniq.clamp(min=0).long()]  # [U, m, s]
        parts = torch.where((uniq >= 0).unsqueeze(-1), parts, torch.zeros_like(parts))
        rows = parts.reshape(-1, s_store)
        ids = inverse.to(idx.dtype)
        ids = torch.where(empty[inverse], torch.full_like(ids, -1), ids)
        return rows, ids.reshape(*lead, l // m)
    g = math.gcd(s, s_store)  # neither divides the other: split to the gcd, then join
    rows, ids = _reshard(pool, idx, g)
    return _reshard(rows, ids, s_store)


def _compact(rows: torch.Tensor, idx_list: List[torch.Tensor]):
    """Keep only the rows some table uses; renumber the tables."""
    used = torch.cat([t.reshape(-1) for t in idx_list]) if idx_list else torch.empty(0, dtype=torch.long)
    used = torch.unique(used[used >= 0])
    remap = torch.full((rows.shape[0],), -1, dtype=torch.long)
    remap[used.long()] = torch.arange(used.numel())
    out = []
    for t in idx_list:
        tl = t.long()
        out.append(torch.where(tl >= 0, remap[tl.clamp(min=0)], tl))
    return rows[used.long()], out


def plan_layout(layers: Mapping[str, str], type_dims: Mapping[str, Tuple[int, int]], slots: int, max_rank: int):
    """A hashable key of the store layout a plan is made for."""
    return (tuple(layers.items()), tuple(sorted(type_dims.items())), int(slots), int(max_rank))


@dataclass
class StorePlan:
    """An adapter converted for one store layout (nothing allocated yet).

    ``rows[(type key, side)] = (rows [R, s_store] float32, idx [L, r, l'])``: the rows it needs and
    its tables into them, numbered from 0; ``tables[path] = (idx_a, idx_b)``, the same tables per layer.
    """

    spec: AdapterSpec
    rows: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]]
    tables: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    layout: tuple

    @property
    def rank(self) -> int:
        return self.spec.rank

    def detached(self) -> "StorePlan":
        """The plan without its source adapter's tensors (``spec.layers`` emptied): what a server keeps on
        the host to reload an evicted tenant into the same store layout, at the size of the rows and tables
        it loads (a tensor-parallel share's source is the whole adapter). Loads only into a store of this
        layout: there is nothing left to convert again."""
        return StorePlan(dataclasses.replace(self.spec, layers={}), self.rows, self.tables, self.layout)

    def table_key(self) -> bytes:
        """Equal for two plans exactly when their tables (rows numbered from 0 within each
        (type, side)) are equal on every layer: such tenants can share one table in a store."""
        h = hashlib.sha256(repr(self.layout).encode())
        for path in sorted(self.tables):
            for t in self.tables[path]:
                t = t.to(torch.int32).contiguous()
                h.update(f"{path}:{tuple(t.shape)}".encode())
                h.update(t.numpy().tobytes())
        return h.digest()

    def rows_needed(self) -> Dict[Tuple[str, str], int]:
        """Store rows per (type key, side) that loading the plan takes."""
        return {k: int(v[0].shape[0]) for k, v in self.rows.items()}


def plan_adapter(spec: AdapterSpec, layers: Mapping[str, str], type_dims: Mapping[str, Tuple[int, int]],
                 slots: int, max_rank: int) -> StorePlan:
    """Convert ``spec`` to rows of shard length ``dim // slots`` and tables into them, validated.

    ``layers``: served module path -> type key; ``type_dims``: type key -> (in, out)."""
    if spec.rank > max_rank:
        raise ValueError(f"adapter rank {spec.rank} exceeds the store's max_rank={max_rank}")
    missing = [p for p in spec.layers if p not in layers]
    if missing:
        raise ValueError(f"adapter targets modules the store does not serve: {missing[:3]}")
    groups: Dict[Tuple[str, str], List[str]] = {}
    for path, (sa, sb) in spec.layers.items():
        key = layers[path]
        h, o = type_dims[key]
        for side, sd, dim in (("A", sa, h), ("B", sb, o)):
            if sd.idx.shape[0] != spec.rank:
                raise ValueError(f"{path}: table {side} has {sd.idx.shape[0]} rank rows, adapter rank is {spec.rank}")
            if sd.idx.shape[1] * sd.pool.shape[1] != dim:
                raise ValueError(f"{path}: side {side} covers {sd.idx.shape[1]} x {sd.pool.shape[1]} features, "
                                 f"the model's layer has {dim}")
            groups.setdefault((key, side), []).append(path)
    rows_out, tables = {}, {}
    for (key, side), paths in groups.items():
        h, o = type_dims[key]
        s_store = (h if side == "A" else o) // slots
        # one shared row space per (type, side): the adapter's distinct pools concatenated
        big, idx = spec.stack(paths, 0 if side == "A" else 1)
        stacked = torch.stack([idx[p] for p in paths])  # [L, r, l]
        rows, new_idx = _reshard(big, stacked, s_store)
        rows, (new_idx,) = _compact(rows, [new_idx])
        # validated once here, before the store changes: per-call checks stay off on CUDA
        validate_tables(new_idx.to(torch.int32), rows.shape[0], name=f"{key} {side} tables")
        rows_out[(key, side)] = (rows, new_idx)
        for k, path in enumerate(paths):
            tables.setdefault(path, [None, None])[0 if side == "A" else 1] = new_idx[k]
    return StorePlan(spec, rows_out, {p: tuple(v) for p, v in tables.items()},
                     plan_layout(layers, type_dims, slots, max_rank))
