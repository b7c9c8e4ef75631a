"""Tensor-parallel shares of an adapter: what one rank of a TP group holds (vLLM's LoRA scheme).

vLLM splits a column-parallel layer (``qkv_proj``, ``gate_up_proj``) by output features and a
row-parallel one (``o_proj``, ``down_proj``) by input features. Its LoRA layers follow: a
column-parallel layer keeps A whole and slices B by output (the rank's output features; no extra
communication), a row-parallel one slices A by input and keeps B whole (each rank's delta is
``x_k A_k^T B^T`` for its input features ``k``; the base layer's own all-reduce sums them into
``x A^T B^T``). :func:`shard_spec` does the same to a sharded adapter, before the store converts
it to rows, so every rank holds only the rows and tables of its share, at compressed size.

A side's vector of ``l`` shards of length ``s`` covers the features ``[0, l s)``; a rank keeps the
columns of its feature range. When a rank boundary falls inside a shard (``s`` does not divide the
range's start and length), every shard is split into pieces of ``g = gcd(s, start, length)``
features first, and the rank keeps the pieces inside its range: the pieces of a straddling shard
live on the ranks that use them, once each, so the split itself costs no memory and no
communication. What TP cannot divide is sharing: a MoS pool row used at positions on both sides of
a boundary (in one layer, or in several layers that share the pool) is needed by both ranks and is
held by both. Per rank, the sliced side takes about ``1 - (1 - 1/tp)^u`` of its rows for a row used
``u`` times at random positions (MoS with ``e = 2``, ``r = 4``: ~3/4 at TP 2); plain LoRA rows
(``l = 1``, one use) divide exactly. The whole side (A of column layers, B of row layers) is held
by every rank, as in vLLM.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import torch

from ..adapter_io import AdapterSpec, Side, split_table

__all__ = ["shard_spec"]

# path -> (side "A" | "B", start feature, features) of the rank's range; a path absent: kept whole
Ranges = Mapping[str, Tuple[str, int, int]]


def _pieces(pool: torch.Tensor, g: int) -> torch.Tensor:
    P, s = pool.shape
    return pool if g == s else pool.reshape(P * (s // g), g)


def _slice_side(sd: Side, start: int, length: int, cache: Dict) -> Side:
    s = int(sd.pool.shape[1])
    l = int(sd.idx.shape[1])
    if start < 0 or length <= 0 or start + length > l * s:
        raise ValueError(f"rank range [{start}, {start + length}) outside the side's {l * s} features")
    g = math.gcd(s, math.gcd(start, length))
    k = s // g
    key = (id(sd.pool), g)
    if key not in cache:  # layers sharing a pool share its pieces (the store deduplicates by identity)
        cache[key] = (_pieces(sd.pool, g), sd.pool)  # keep the source alive: ids must not be reused
    pool = cache[key][0]
    idx = split_table(sd.idx.long(), k)
    return Side(pool, idx[:, start // g:(start + length) // g].contiguous())


def shard_spec(spec: AdapterSpec, ranges: Ranges) -> AdapterSpec:
    """The share of ``spec`` one rank holds: for every layer with a range, the named side cut to the
    rank's features (``"B"``: output features of a column-parallel layer, ``"A"``: input features of
    a row-parallel one); the other side and layers without a range whole. Pools are shared as in
    ``spec``; rows a rank never uses are dropped when the store converts the share to rows."""
    cache: Dict = {}
    layers = {}
    for path, (sa, sb) in spec.layers.items():
        r = ranges.get(path)
        if r is None:
            layers[path] = (sa, sb)
            continue
        side, start, length = r
        if side == "A":
            layers[path] = (_slice_side(sa, int(start), int(length), cache), sb)
        elif side == "B":
            layers[path] = (sa, _slice_side(sb, int(start), int(length), cache))
        else:
            raise ValueError(f"{path}: range side must be 'A' or 'B', got {side!r}")
    return AdapterSpec(kind=spec.kind, rank=spec.rank, scale=spec.scale, layers=layers, config=spec.config,
                       types=dict(spec.types), source=spec.source, type_dims={})
