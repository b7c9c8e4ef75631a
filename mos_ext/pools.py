"""Initial shard pools and index tables of one projection type (MOS.md §2); the pool bank holds them.

For one projection type (q_proj, up_proj, ...) with in-dim ``h``, out-dim ``o`` and ``L``
targeted layers, a method defines the pools ``A [N_A, s_a]``, ``B [N_B, s_b]`` and each layer's
tables ``idx_a [r, l_a]``, ``idx_b [r, l_b]`` (int32, rank-major):

* ``mos``: ``N = e*L*l`` shards per side; public rows ``[0, P0)``, ``P0 = (e-p)*L*l``; layer
  ``k`` owns the private block ``P0 + [k*p*l, (k+1)*p*l)``. Its table takes the first
  ``(r-p)*l`` entries of a random permutation of ``[0, P0)`` then its private block, drawn
  independently per layer and per side (unless ``tie_indices``).
* ``lora``: rank-``r`` LoRA written as shards: ``l = 1``, every layer private (``e = p = r``).
* ``miss``: MiSS default: ``A`` is the frozen identity ``I_r`` (shard length ``r``,
  ``l_a = h/r``, ``idx_a[j, i] = j``) and ``B`` stacks each layer's ``D [r, o]``.
* ``miss_mini``: MiSS mini: as ``miss`` with ``D [r, mini_r]`` per layer, ``l_b = o/mini_r``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .layout import MoSHyper


def sample_tables(cfg: MoSHyper, h: int, o: int, L: int, gen: torch.Generator):
    """Index tables of every layer of one type: (idx_a [L, r, l_a], idx_b [L, r, l_b]) int32."""
    r = cfg.r
    n_a, s_a, l_a, n_b, s_b, l_b = cfg.layout(h, o, L)
    if cfg.method in ("mos", "lora"):
        e, p, l = cfg.equivalent_rank, cfg.private_rank, cfg.shards_per_vector
        P0 = (e - p) * L * l

        def one(k):
            shared = torch.randperm(P0, generator=gen)[: (r - p) * l] if P0 else torch.empty(0, dtype=torch.long)
            private = P0 + k * p * l + torch.arange(p * l)
            return torch.cat([shared, private]).reshape(r, l)

        idx_a = torch.stack([one(k) for k in range(L)])
        idx_b = idx_a.clone() if cfg.tie_indices else torch.stack([one(k) for k in range(L)])
    else:
        j = torch.arange(r)
        idx_a = j.view(1, r, 1).expand(L, r, l_a)
        idx_b = (torch.arange(L).view(L, 1, 1) * r + j.view(1, r, 1)).expand(L, r, l_b)
    return idx_a.to(torch.int32).contiguous(), idx_b.to(torch.int32).contiguous()


def init_pools(cfg: MoSHyper, h: int, o: int, L: int, gen: Optional[torch.Generator] = None,
               dtype=torch.float32, device=None):
    """Initial pools ``(A [N_A, s_a], B [N_B, s_b])`` of one type (MOS.md §2): ``A ~ U(-1/sqrt(h), 1/sqrt(h))``
    (LoRA's bound for the full in-dim), ``B = 0``; MiSS: ``A`` is the frozen identity ``I_r``."""
    n_a, s_a, _, n_b, s_b, _ = cfg.layout(h, o, L)
    if device is not None and torch.device(device).type == "meta":  # shapes only (a model built on meta)
        return (torch.empty(n_a, s_a, dtype=dtype, device="meta"), torch.empty(n_b, s_b, dtype=dtype, device="meta"))
    if cfg.method in ("miss", "miss_mini"):
        a = torch.eye(n_a, dtype=torch.float64)
    else:
        bound = 1.0 / math.sqrt(h)
        a = (torch.rand(n_a, s_a, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    b = torch.zeros(n_b, s_b, dtype=torch.float64)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
