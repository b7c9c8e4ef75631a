"""Plain-PyTorch reference of every ``torch.ops.mos`` operator: the oracle of the tests.

Written straight from ``shared/design/MOS.md`` §3, for clarity only: a Python
loop over segments, the adapter matrices materialized with indexing, all
arithmetic in float64, one cast to the op's output dtype at the end.
A ``-1`` table entry is *skipped*: its slot contributes nothing, so Inf/NaN in
the activations or rank-space values it would have met never leak into the
result (multiplying by a zero shard would turn them into NaN); the kernels on
every device do the same. Functions
return new tensors (the in-place ops' results are returned instead of written)
and are differentiable through ordinary autograd, so they also give reference
gradients.

Shared tables (``map_a`` / ``map_b`` ``[T, 2]`` int32, optional): tenant ``t`` reads table
``idx[map[t, 0]]`` and its entries ``p >= 0`` name pool rows ``map[t, 1] + p``; without a map
tenant ``t`` reads ``idx[t]`` as global rows (``docs/OPS.md``).
"""
from __future__ import annotations

import torch

__all__ = ["gather_shards", "sgmv_shrink", "sgmv_expand", "sgmv", "shard_grad", "sharded_lora", "segments",
           "tenant_table"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segments(seg_indptr: torch.Tensor, seg_tenant: torch.Tensor):
    """``(start, end, tenant)`` of every segment with a tenant ``>= 0``."""
    ip = seg_indptr.tolist()
    for g, t in enumerate(seg_tenant.tolist()):
        if t >= 0:
            yield ip[g], ip[g + 1], t


def gather_shards(pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``pool[idx]`` with ``-1`` entries as zero shards, slots concatenated: ``[..., r, l*s]``."""
    s = pool.shape[1]
    shards = pool[idx.long().clamp(min=0)]  # [..., r, l, s]
    shards = torch.where((idx >= 0).unsqueeze(-1), shards, torch.zeros_like(shards))
    return shards.reshape(*idx.shape[:-1], idx.shape[-1] * s)


def tenant_table(idx: torch.Tensor, map_: torch.Tensor, t: int) -> torch.Tensor:
    """Tenant ``t``'s table ``[r, l]`` in global pool rows: ``idx[t]`` without a map; with one,
    table ``map[t, 0]`` with every entry ``>= 0`` offset by the row base ``map[t, 1]``."""
    if map_ is None:
        return idx[t]
    u, base = (int(v) for v in map_[t].tolist())
    tab = idx[u]
    return torch.where(tab >= 0, tab + base, tab)


def _shards(pool, idx_t):
    """(shards [r, l, s] float64 with skipped entries zero, valid [r, l]) of one tenant's table."""
    valid = idx_t >= 0
    shards = pool.double()[idx_t.long().clamp(min=0)]
    return torch.where(valid.unsqueeze(-1), shards, torch.zeros_like(shards)), valid


def _shrink_t(x_seg, pool_a, idx_t):
    """``x_seg @ A_t.T`` where a ``-1`` slot contributes nothing (skipped, never ``x * 0``)."""
    shards, valid = _shards(pool_a, idx_t)
    r, l, s = shards.shape
    dots = torch.einsum("nis,jis->nji", x_seg.double().reshape(-1, l, s), shards)  # [m, r, l]
    return torch.where(valid, dots, torch.zeros_like(dots)).sum(-1)


def _expand_t(v_seg, pool_b, idx_t):
    """``v_seg @ B_t.T`` where a ``-1`` slot of rank row j takes nothing from ``v[:, j]``."""
    shards, valid = _shards(pool_b, idx_t)
    r, l, s = shards.shape
    vm = v_seg.double().unsqueeze(1).expand(-1, l, -1)  # [m, l, r]
    vm = torch.where(valid.T.unsqueeze(0), vm, torch.zeros_like(vm))
    return torch.einsum("nij,jis->nis", vm, shards).reshape(-1, l * s)


def sgmv_shrink(x, pool_a, idx_a, seg_indptr, seg_tenant, map_a=None) -> torch.Tensor:
    """``v[s:e] = x[s:e] @ A_t.T``; other rows zero. Returns ``[N, r]`` in the accumulation dtype."""
    v = torch.zeros(x.shape[0], idx_a.shape[1], dtype=torch.float64, device=x.device)
    for s, e, t in segments(seg_indptr, seg_tenant):
        v[s:e] = _shrink_t(x[s:e], pool_a, tenant_table(idx_a, map_a, t))
    return v.to(_acc_dtype(x.dtype))


def sgmv_expand(y, v, pool_b, idx_b, scale, seg_indptr, seg_tenant, map_b=None) -> torch.Tensor:
    """New ``y`` with ``y[s:e] += (scale[t] * v[s:e]) @ B_t.T``.

    ``scale[t]`` multiplies ``v`` before the expand, as the kernels do: the same for finite
    values, and a non-finite scale reaches only the outputs with at least one valid term (an
    empty sum stays nothing, never ``NaN * 0``)."""
    out = y.double().clone()
    for s, e, t in segments(seg_indptr, seg_tenant):
        out[s:e] = out[s:e] + _expand_t(scale[t].double() * v[s:e].double(), pool_b, tenant_table(idx_b, map_b, t))
    return out.to(y.dtype)


def sgmv(y, x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant, map_a=None, map_b=None) -> torch.Tensor:
    """New ``y`` with ``y[s:e] += (scale[t] * (x[s:e] @ A_t.T)) @ B_t.T`` (one rounding; the
    scale placed as in :func:`sgmv_expand`)."""
    out = y.double().clone()
    for s, e, t in segments(seg_indptr, seg_tenant):
        v = _shrink_t(x[s:e], pool_a, tenant_table(idx_a, map_a, t))
        out[s:e] = out[s:e] + _expand_t(scale[t].double() * v, pool_b, tenant_table(idx_b, map_b, t))
    return out.to(y.dtype)


def shard_grad(grad_pool, u, x, idx, scale, seg_indptr, seg_tenant) -> torch.Tensor:
    """New ``grad_pool`` with ``grad_pool[idx[t, j, i]] += scale[t] * sum_n u[n, j] * x[n, i*s:(i+1)*s]``."""
    out = grad_pool.double().clone()
    s_len = grad_pool.shape[1]
    r, l = idx.shape[1], idx.shape[2]
    for s, e, t in segments(seg_indptr, seg_tenant):
        g = scale[t].double() * (u[s:e].double().T @ x[s:e].double())  # [r, l*s] = gradient of A_t
        rows = idx[t].reshape(-1)
        keep = rows >= 0
        out.index_add_(0, rows[keep].long(), g.reshape(r * l, s_len)[keep])
    return out.to(grad_pool.dtype)


def sharded_lora(x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant) -> torch.Tensor:
    """``delta[s:e] = scale[t] * (x[s:e] @ A_t.T) @ B_t.T``, zero elsewhere; in ``x``'s dtype.

    Differentiable in ``x``, ``pool_a``, ``pool_b`` through plain autograd (the
    naive implementation the fused backward is checked against).
    """
    o = idx_b.shape[2] * pool_b.shape[1]
    delta = torch.zeros(x.shape[0], o, dtype=x.dtype, device=x.device)
    return sgmv(delta, x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant)
