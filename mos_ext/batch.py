"""Batch metadata: which adapter each row of a batch uses, as ``sgmv`` segments (vLLM's punica_wrapper role).

The ops take a batch's adapter choice as segments: ``seg_indptr`` (int32 ``[S + 1]``, token
offsets, non-decreasing) and ``seg_tenant`` (int32 ``[S]``, an index into the tables' first
dimension, ``-1`` for "no adapter"). This module is the one place that builds them, for
training (:class:`mos_ext.layers.MoSLinear`), serving (:class:`mos_ext.serving.MultiTenantModel`)
and the vLLM plugin, and the one place that applies ``sgmv`` over a layer's output slices.

* :func:`build_segments` turns per-row tenant ids (``-1`` = none) and tokens per row into a
  :class:`Segments`. Rows are kept in order (no sorting), so the output rows line up with
  the input rows.
* :class:`BatchMetadata` holds a forward pass's per-row tenant ids and builds the segments for a
  given activation layout once; every layer of that forward asks it and gets the same tensors.
* :func:`single_segment` is the one-tenant batch of training (cached per size and device).
* :func:`add_sgmv` adds every slice's ``sgmv`` to a layer output, staging through the
  adapters' dtype when the output is in another one.

``mos_ext.reference.segments`` keeps its own plain reading of the same metadata: it is the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import ops

__all__ = ["Segments", "BatchMetadata", "build_segments", "single_segment", "SgmvSlice", "add_sgmv"]


@dataclass(frozen=True)
class Segments:
    """One batch's segment metadata, ready for the ops.

    ``indptr`` int32 ``[S + 1]`` token offsets (``indptr[0] == 0``, ``indptr[-1] == num_tokens``);
    ``tenant`` int32 ``[S]``, ``-1`` where the segment's rows use no adapter; both on the
    activations' device. ``active``: some segment has a tenant (``False``: every op is a no-op).
    """

    indptr: torch.Tensor
    tenant: torch.Tensor
    num_tokens: int
    active: bool

    def args(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(seg_indptr, seg_tenant)``, the ops' last two arguments."""
        return self.indptr, self.tenant


def build_segments(row_tenants: Union[torch.Tensor, Sequence[int]], tokens_per_row: int = 1, *,
                   device=None, merge: bool = True) -> Segments:
    """Segments of a batch of ``N`` rows, row ``i`` using tenant ``row_tenants[i]`` (``-1``: none)
    for its ``tokens_per_row`` consecutive tokens (token ``n`` belongs to row ``n // tokens_per_row``).

    ``merge=True`` joins consecutive rows with the same tenant into one segment (a decode step's
    tokens, vLLM's token mapping); ``merge=False`` keeps one segment per row, so that a row's result
    never depends on its neighbours' tenants (the ops may pick another kernel for a longer segment).
    Built on the host and copied to ``device`` once.
    """
    t = torch.as_tensor(row_tenants, dtype=torch.int64).reshape(-1).to("cpu")
    per = int(tokens_per_row)
    if per < 0:
        raise ValueError(f"tokens_per_row must be >= 0, got {per}")
    if merge and t.numel():
        vals, counts = torch.unique_consecutive(t, return_counts=True)
    else:
        vals, counts = t, torch.ones_like(t)
    indptr = torch.zeros(vals.numel() + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts * per, 0)
    tenant = torch.where(vals >= 0, vals, torch.full_like(vals, -1)).to(torch.int32)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return Segments(indptr.to(torch.int32).to(dev), tenant.to(dev), int(t.numel()) * per, bool((vals >= 0).any()))


class BatchMetadata:
    """A forward pass's adapter choice per row, and the segments built from it once per layout.

    ``row_tenants``: one tenant id per batch row (sequence), ``-1`` for none. Layers call
    :meth:`segments` with their activations' ``(rows, tokens_per_row, device)``; the first call
    builds, every later one returns the same :class:`Segments`. A batch of ``k * N`` rows (beam
    search, ``num_return_sequences``) repeats each row's tenant ``k`` times, in order.
    """

    def __init__(self, row_tenants: Union[torch.Tensor, Sequence[int]], *, merge: bool = True):
        self.row_tenants = [int(v) for v in torch.as_tensor(row_tenants, dtype=torch.int64).reshape(-1).tolist()]
        self.merge = merge
        self._cache: Dict[tuple, Segments] = {}

    def __len__(self) -> int:
        return len(self.row_tenants)

    def segments(self, rows: int, tokens_per_row: int, device) -> Segments:
        key = (int(rows), int(tokens_per_row), torch.device(device))
        seg = self._cache.get(key)
        if seg is None:
            seg = build_segments(self._per_row(rows), tokens_per_row, device=device, merge=self.merge)
            self._cache[key] = seg
        return seg

    def token_tenants(self, rows: int, tokens_per_row: int) -> torch.Tensor:
        """The tenant of every token of a call with this layout: ``[rows * tokens_per_row]`` int64 on the
        CPU (what :meth:`segments` encodes, one entry per token)."""
        return self._per_row(rows).repeat_interleave(int(tokens_per_row))

    def _per_row(self, rows: int) -> torch.Tensor:
        b0 = len(self.row_tenants)
        if b0 == 0 or rows % b0:
            raise ValueError(f"the model was called with {rows} sequences but {b0} adapter choices were given")
        return torch.tensor(self.row_tenants, dtype=torch.int64).repeat_interleave(rows // b0)


_SINGLE: Dict[tuple, Segments] = {}


def single_segment(num_tokens: int, device, tenant: int = 0) -> Segments:
    """All ``num_tokens`` tokens use ``tenant`` (training's one-adapter batch); cached per size and device."""
    key = (int(num_tokens), torch.device(device), int(tenant))
    seg = _SINGLE.get(key)
    if seg is None:
        if len(_SINGLE) > 256:
            _SINGLE.clear()
        seg = Segments(torch.tensor([0, int(num_tokens)], dtype=torch.int32, device=device),
                       torch.full((1,), int(tenant), dtype=torch.int32, device=device), int(num_tokens), tenant >= 0)
        _SINGLE[key] = seg
    return seg


class SgmvSlice(NamedTuple):
    """One ``sgmv`` into columns ``[off, off + size)`` of a layer's output: pools, tables and,
    for shared tables (``docs/OPS.md``), the per-tenant maps (``None``: one table per tenant)."""

    pool_a: torch.Tensor
    pool_b: torch.Tensor
    idx_a: torch.Tensor
    idx_b: torch.Tensor
    off: int
    size: int
    map_a: Optional[torch.Tensor] = None
    map_b: Optional[torch.Tensor] = None


def add_sgmv(out: torch.Tensor, x: torch.Tensor, slices: Iterable[SgmvSlice], scale: torch.Tensor,
             seg: Optional[Segments], dtype: torch.dtype) -> torch.Tensor:
    """``out[..., off:off+size] += sgmv(x; pool_a, pool_b, idx_a, idx_b, scale[, map_a, map_b])`` for
    every slice (an :class:`SgmvSlice`, or a plain ``(pool_a, pool_b, idx_a, idx_b, off, size)``
    tuple); returns the result (``out`` itself when written in place).

    ``x`` ``[..., in]`` and ``out`` ``[..., o]`` have one row per token of ``seg``. The adapters run in
    ``dtype`` (the pools'): ``x`` is cast to it; an ``out`` in another dtype (or not viewable as
    ``[N, o]`` rows) gets the deltas summed in a ``dtype`` buffer and added once, cast to ``out``'s dtype.
    Nothing happens when ``seg`` is ``None`` or has no tenant.
    """
    slices = list(slices)
    if seg is None or not seg.active or not slices:
        return out
    xs = x.reshape(-1, x.shape[-1])
    if xs.dtype != dtype:
        xs = xs.to(dtype)
    if xs.shape[-1] > 1 and xs.stride(-1) != 1:
        xs = xs.contiguous()
    y = out.reshape(-1, out.shape[-1])
    in_place = y.dtype == dtype and y.is_contiguous() and y.data_ptr() == out.data_ptr()
    if not in_place:
        y = torch.zeros(y.shape, dtype=dtype, device=y.device)
    ip, tn = seg.args()
    width = y.shape[1]
    for sl in slices:
        pool_a, pool_b, idx_a, idx_b, off, size, map_a, map_b = sl if isinstance(sl, SgmvSlice) else SgmvSlice(*sl)
        view = y if (off == 0 and size == width) else y[:, off:off + size]
        ops.sgmv(view, xs, pool_a, pool_b, idx_a, idx_b, scale, ip, tn, map_a, map_b)
    if in_place:
        return out
    return out + y.reshape(out.shape).to(out.dtype)
