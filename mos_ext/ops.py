"""The Python face of the ``torch.ops.mos`` operators.

Notation (``shared/design/MOS.md`` §3): a batch of ``N`` tokens is cut into
segments; segment ``g`` covers tokens ``[seg_indptr[g], seg_indptr[g+1])`` and
uses tenant ``t = seg_tenant[g]`` (``-1``: no adapter, tokens untouched). Tenant
``t`` has index tables ``idx_a[t] [r, l_a]`` and ``idx_b[t] [r, l_b]`` into
stacked pools ``pool_a [P_a, s_a]``, ``pool_b [P_b, s_b]``; its matrices are
``A_t = pool_a[idx_a[t]].reshape(r, h)`` and ``B_t = pool_b[idx_b[t]].reshape(r, o).T``
with ``h = l_a * s_a``, ``o = l_b * s_b``. An index ``-1`` is a zero shard (a
tenant of smaller rank pads whole rank rows with ``-1``).

Dtypes: activations fp32 / fp64 / fp16 / bf16; pools in the activation dtype
or fp32; index tables and segment tensors int32; ``scale`` fp32 ``[T]``. The
rank-space tensors (``v``, ``u``) and pool gradients use the accumulation dtype:
fp64 for fp64 activations, else fp32.

What every op checks, and when (``csrc/checks.h``):

* every call, every device, host-side only (no sync, CUDA-graph safe): dtypes,
  devices, ranks, shapes, strides, and memory overlap: the output (``y``,
  ``grad_pool``) must not overlap itself nor share memory with an input the op
  reads (``x``, ``v``, the pools, ``u``) -> ``ValueError``;
* values of ``idx_*``, ``seg_indptr``, ``seg_tenant`` -> ``IndexError``: every
  call for CPU tensors (cheap; ``mos_ext.set_index_checks(False)`` turns them
  off); for CUDA tensors only when opted in with
  ``mos_ext.set_device_index_checks(True)`` / ``MOS_EXT_CHECK_INDICES_DEVICE=1``
  (one device reduction and a scalar sync per tensor), and never while the
  stream is capturing a CUDA graph. Validate tables once where they are made
  or loaded with :func:`validate_tables` (``AdapterStore.load`` does).
  Unchecked bad values never cause an out-of-bounds access: out-of-range
  entries are skipped like ``-1`` and segment bounds clamped.

Shared tables (``docs/OPS.md``): ``sgmv``, ``sgmv_shrink`` and ``sgmv_expand`` take an
optional map per side, ``map_a`` / ``map_b`` ``[T, 2]`` int32, row ``t`` = (table ``u``, row
base). With a map the tables ``idx [U, r, l]`` are shared: tenant ``t`` reads ``idx[u]``, and
its entry ``p >= 0`` names pool row ``base + p``; tenants trained from one recipe (equal
tables) then cost one table in all, not one each. Map values are checked with the tables
(``u`` in ``[0, U)``, ``0 <= base``, ``base + max entry < P``; :func:`validate_map`); unchecked
bad rows leave that tenant nothing, never an out-of-bounds read.

A ``-1`` entry is skipped, never multiplied as a zero shard: Inf/NaN in ``x``
(or in the columns of ``v`` of a padded rank row) do not reach ``y`` through
it, on the CPU and on CUDA alike.

This module registers the fake (meta) kernels and the autograd formula of
``gather_shards``; the kernels, ``sharded_lora``'s composite, and the autograd
of ``sharded_lora`` and ``sgmv_shrink`` (``csrc/sharded_lora.cpp``) are C++/CUDA.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the schemas and kernels)

__all__ = ["gather_shards", "sgmv_shrink", "sgmv_expand", "sgmv", "shard_grad", "sharded_lora", "validate_tables",
           "validate_map", "validate_segments", "pool_grad_tap", "PoolGradTaps"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------
# Public wrappers


def gather_shards(pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out = pool[idx].reshape(*idx.shape[:-1], l * s)`` with ``-1`` entries giving zeros.

    pool: ``[P, s]`` float; idx: ``[..., r, l]`` int32. Returns ``[..., r, l*s]`` in
    the pool dtype: ``A`` for an A table, ``Bᵀ`` for a B table. Differentiable in ``pool``.
    """
    return torch.ops.mos.gather_shards(pool, idx)


def sgmv_shrink(x, pool_a, idx_a, seg_indptr, seg_tenant, map_a=None) -> torch.Tensor:
    """``v[s:e] = x[s:e] @ A_t.T`` per segment (rows outside every segment or of ``-1`` tenants are 0).

    x: ``[N, h]``; pool_a: ``[P_a, s_a]``; idx_a: ``[T, r, l_a]``; returns ``v [N, r]``
    in the accumulation dtype. Differentiable in ``x`` and ``pool_a`` (without ``map_a``).
    ``map_a`` ``[T, 2]`` int32: shared tables (module docstring); ``idx_a`` is then ``[U, r, l_a]``.
    """
    return torch.ops.mos.sgmv_shrink(x, pool_a, idx_a, seg_indptr, seg_tenant, map_a)


def sgmv_expand(y, v, pool_b, idx_b, scale, seg_indptr, seg_tenant, map_b=None) -> torch.Tensor:
    """``y[s:e] += scale[t] * v[s:e] @ B_t.T`` per segment, in place; returns ``y``.

    y: ``[N, o]``; v: ``[N, r]`` accumulation dtype; pool_b: ``[P_b, s_b]``; idx_b:
    ``[T, r, l_b]`` (``[U, r, l_b]`` with ``map_b [T, 2]``: shared tables); scale: ``[T]`` fp32.
    Accumulates in fp32 (fp64) and rounds once.
    """
    torch.ops.mos.sgmv_expand(y, v, pool_b, idx_b, scale, seg_indptr, seg_tenant, map_b)
    return y


def sgmv(y, x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant, map_a=None, map_b=None) -> torch.Tensor:
    """``y[s:e] += scale[t] * (x[s:e] @ A_t.T) @ B_t.T`` per segment, in place; returns ``y``.

    The serving op: many tenants' sharded adapters applied to one mixed batch,
    shards read straight from the pools (no materialized ``A``/``B``). With shared
    tables, ``map_a`` and ``map_b`` ``[T, 2]`` int32 (both or neither): tenant ``t``
    reads table ``idx_a[map_a[t, 0]]`` with its entries offset by ``map_a[t, 1]`` pool rows
    (likewise B); see the module docstring.
    """
    torch.ops.mos.sgmv(y, x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant, map_a, map_b)
    return y


def shard_grad(grad_pool, u, x, idx, scale, seg_indptr, seg_tenant, deterministic: bool = False):
    """Fused pool-gradient accumulation, in place; returns ``grad_pool``::

        grad_pool[idx[t, j, i]] += scale[t] * sum_{n in t's segments} u[n, j] * x[n, i*s:(i+1)*s]

    grad_pool: ``[P, s]`` accumulation dtype; u: ``[N, r]`` accumulation dtype; x:
    ``[N, l*s]``; idx: ``[T, r, l]``. For the A pool pass ``u = dy @ B`` (the shrink of
    ``dy`` through the B side) and ``x``; for the B pool pass ``u = v`` and ``x = dy``.
    ``deterministic=True`` asks for run-to-run bitwise reproducibility (the CPU
    kernel always is).
    """
    torch.ops.mos.shard_grad(grad_pool, u, x, idx, scale, seg_indptr, seg_tenant, deterministic)
    return grad_pool


def sharded_lora(x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant) -> torch.Tensor:
    """Differentiable ``delta[s:e] = scale[t] * (x[s:e] @ A_t.T) @ B_t.T`` (zero outside segments).

    Gradients flow to ``x``, ``pool_a`` and ``pool_b``; the pool gradients go
    through the fused accumulation (:func:`shard_grad`), never a materialized
    per-layer ``A``/``B`` gradient. ``scale`` is a constant.
    """
    delta, _ = torch.ops.mos.sharded_lora(x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant)
    return delta


# ----------------------------------------------------------------------------
# One-off validation and the per-step pool-gradient accumulator


def validate_tables(idx: torch.Tensor, pool_rows, name: str = "idx") -> torch.Tensor:
    """Check once that every entry of an index table is ``-1`` or in ``[0, pool_rows)``.

    For tables made or loaded outside the hot path (``AdapterStore.load``, an
    adapter's tables when the model is built), so that per-call value checks on
    CUDA can stay off. Works on any device: on a GPU one reduction and one scalar
    sync (a second one to locate a bad entry). ``pool_rows`` is an int or the
    pool tensor. Raises ``TypeError`` unless ``idx`` is int32 and ``ValueError``
    naming ``name`` and the first bad entry; returns ``idx``.
    """
    P = int(pool_rows.shape[0]) if isinstance(pool_rows, torch.Tensor) else int(pool_rows)
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    _C.validate_index_values(idx, P, name)
    return idx


def validate_map(map_: torch.Tensor, idx: torch.Tensor, pool_rows, name: str = "map") -> torch.Tensor:
    """Check once that a shared-table map ``[T, 2]`` fits its tables ``idx [U, r, l]`` and a pool
    of ``pool_rows`` rows: every row names a table in ``[0, U)`` and a base ``>= 0`` with
    ``base + (the table's largest entry) < pool_rows``. Raises ``ValueError`` naming ``name``,
    the tenant and the problem; returns ``map_``."""
    P = int(pool_rows.shape[0]) if isinstance(pool_rows, torch.Tensor) else int(pool_rows)
    _C.validate_map_values(map_, idx, P, name)
    return map_


def validate_segments(seg_indptr: torch.Tensor, seg_tenant: torch.Tensor, num_tokens: int, num_tenants: int) -> None:
    """Check segment metadata once (``seg_indptr`` non-decreasing within ``[0, num_tokens]``,
    ``seg_tenant`` in ``[-1, num_tenants)``), on any device; raises ``ValueError``."""
    _C.validate_segment_values(seg_indptr, seg_tenant, int(num_tokens), int(num_tenants))


def pool_grad_tap(pool: torch.Tensor) -> torch.Tensor:
    """Identity on ``pool`` for one forward pass, so that the pool gradients of all its
    :func:`sharded_lora` consumers go into **one** accumulator per backward pass.

    Without it, every layer that reads a shared pool gets its own pool-sized fp32 zero
    gradient in backward, which autograd then casts and adds up (L layers: L memsets,
    L-1 pool-sized adds). Through a tap, each layer's ``shard_grad`` adds straight into
    one fp32 (fp64 for fp64 activations) buffer made by the first layer's backward; the
    tap hands it to autograd once, cast to the pool's dtype, as the pool's ordinary
    gradient (``.grad``, hooks, DDP / FSDP2 see one gradient per step). Other consumers
    of the tapped tensor still work (their gradients are added in). Results equal the
    untapped ones up to fp32 summation order.

    Use the returned tensor in place of ``pool`` in every layer of one forward pass;
    make a new tap per forward pass (see :class:`PoolGradTaps`). Returns ``pool`` itself
    when no gradient is needed (grad mode off, ``pool.requires_grad`` False) or under
    ``torch.compile`` (the tap is an eager autograd node).
    """
    return _C.pool_grad_tap(pool) if _wants_tap(pool) else pool


def _wants_tap(pool: torch.Tensor) -> bool:
    """A tap only where it can collect a gradient: grad mode on, a pool that needs one, eager."""
    return torch.is_grad_enabled() and pool.requires_grad and not _compiling()


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


class PoolGradTaps:
    """A per-forward-pass cache of :func:`pool_grad_tap`.

    ``taps(pool)`` returns the same tap for the same pool until :meth:`reset`.
    ``taps.take(owner, pool_a, pool_b)`` does the same for a layer ``owner`` (any hashable,
    e.g. ``(id(layer), adapter_name)``) and resets the cache by itself when an owner asks a
    second time, which is how a new forward pass shows itself; so a model needs no hooks.
    Whatever the cache does, gradients stay right: a consumer that does not read the pool
    straight from the tap its autograd edge points to returns its gradient the ordinary way
    (activation-checkpoint recomputation, a layer called twice, two forward passes before
    one backward all work; only the saving shrinks)."""

    def __init__(self):
        self._taps = {}
        self._owners = set()

    def __call__(self, pool: torch.Tensor) -> torch.Tensor:
        if not _wants_tap(pool):
            return pool
        hit = self._taps.get(id(pool))
        if hit is not None and hit[0] is pool:
            return hit[1]
        tap = _C.pool_grad_tap(pool)
        self._taps[id(pool)] = (pool, tap)
        return tap

    def take(self, owner, *pools: torch.Tensor):
        """The taps of ``pools`` for layer ``owner`` (a tuple), starting a new forward pass when
        ``owner`` already took its taps since the last reset."""
        if not torch.is_grad_enabled() or _compiling():
            return pools
        if owner in self._owners:
            self.reset()
        self._owners.add(owner)
        return tuple(self(p) for p in pools)

    def reset(self) -> None:
        self._taps.clear()
        self._owners.clear()

    def __len__(self) -> int:
        return len(self._taps)

    # A copied or pickled model starts with an empty cache (taps are graph tensors).
    def __deepcopy__(self, memo):
        return PoolGradTaps()

    def __reduce__(self):
        return (PoolGradTaps, ())


# ----------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only.


@torch.library.register_fake("mos::gather_shards")
def _gather_shards_fake(pool, idx):
    return pool.new_empty((*idx.shape[:-1], idx.shape[-1] * pool.shape[1]))


@torch.library.register_fake("mos::sgmv_shrink")
def _sgmv_shrink_fake(x, pool_a, idx_a, seg_indptr, seg_tenant, map_a=None):
    return x.new_empty((x.shape[0], idx_a.shape[1]), dtype=_acc_dtype(x.dtype))


@torch.library.register_fake("mos::sgmv_expand")
def _sgmv_expand_fake(y, v, pool_b, idx_b, scale, seg_indptr, seg_tenant, map_b=None):
    return None


@torch.library.register_fake("mos::sgmv")
def _sgmv_fake(y, x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant, map_a=None, map_b=None):
    return None


@torch.library.register_fake("mos::shard_grad")
def _shard_grad_fake(grad_pool, u, x, idx, scale, seg_indptr, seg_tenant, deterministic=False):
    return None


@torch.library.register_fake("mos::sharded_lora")
def _sharded_lora_fake(x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant):
    _check_tables_agree(idx_a, idx_b)
    o = idx_b.shape[2] * pool_b.shape[1]
    return x.new_empty((x.shape[0], o)), x.new_empty((x.shape[0], idx_a.shape[1]), dtype=_acc_dtype(x.dtype))


# ----------------------------------------------------------------------------
# sharded_lora: its composite and autograd are C++ (csrc/sharded_lora.cpp). The fake kernel
# repeats the composite's one check of its own (check_tables_agree) on possibly symbolic shapes.


def _check_tables_agree(idx_a, idx_b):
    if idx_a.dim() != 3 or idx_b.dim() != 3 or idx_a.shape[:2] != idx_b.shape[:2]:
        raise ValueError(
            "idx_a and idx_b must be [T, r, l_a] and [T, r, l_b] with the same T and r, "
            f"got shapes {tuple(idx_a.shape)} and {tuple(idx_b.shape)}"
        )


# ----------------------------------------------------------------------------
# Autograd: sgmv_shrink's and sharded_lora's are C++ (csrc/sharded_lora.cpp); gather_shards' is here.


def _gather_setup(ctx, inputs, output):
    pool, idx = inputs
    ctx.pool_shape = pool.shape
    ctx.save_for_backward(idx)


def _gather_backward(ctx, dout):
    (idx,) = ctx.saved_tensors
    s = ctx.pool_shape[1]
    flat = idx.reshape(-1)
    src = dout.reshape(flat.numel(), s) * (flat >= 0).unsqueeze(1).to(dout.dtype)
    dpool = dout.new_zeros(ctx.pool_shape)
    dpool.index_add_(0, flat.clamp(min=0).long(), src)
    return dpool, None


torch.library.register_autograd("mos::gather_shards", _gather_backward, setup_context=_gather_setup)
