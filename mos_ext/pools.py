"""Shard pools and index tables of a whole model (MOS.md §2): the one owner of shared state.

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

import dataclasses
import json
import math
from typing import List, Optional, Sequence

import torch
from torch import nn

METHODS = ("mos", "lora", "miss", "miss_mini")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class MoSConfig:
    """Hyper-parameters of a sharded adapter (MoS by default; ``method`` picks LoRA or MiSS).

    r: rank of each layer's adapter. equivalent_rank (e): the LoRA rank with the same
    number of trainable parameters (sets the pool size). shards_per_vector (l): shards per
    row of A / column of B. private_rank (p): rank rows private to each layer.
    lora_alpha: scale = lora_alpha / r (MiSS: 1). lora_dropout: dropout on the adapter input.
    target_modules: last names of the linear modules to adapt. tie_indices: ablation, B uses
    A's table (no pair dissociation). seed: seeds the index tables and the init.
    mini_r: MiSS mini's shard length of D.
    """

    r: int = 8
    equivalent_rank: int = 2
    shards_per_vector: int = 4
    private_rank: int = 1
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Sequence[str] = DEFAULT_TARGETS
    seed: int = 0
    tie_indices: bool = False
    method: str = "mos"
    mini_r: Optional[int] = None

    def __post_init__(self):
        self.target_modules = list(self.target_modules)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module type")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.method == "mos":
            e, p, l = self.equivalent_rank, self.private_rank, self.shards_per_vector
            if e < 1:
                raise ValueError(f"equivalent_rank must be >= 1, got {e}")
            if l < 1:
                raise ValueError(f"shards_per_vector must be >= 1, got {l}")
            if not 0 <= p <= min(self.r, e):
                raise ValueError(f"private_rank must satisfy 0 <= p <= min(r, equivalent_rank) = {min(self.r, e)}, got {p}")
            if p == e and self.r != e:
                raise ValueError(f"private_rank == equivalent_rank ({e}) leaves no shared shards, so r must equal it "
                                 f"(MoS is then LoRA of rank {e}); got r={self.r}")
        if self.method == "lora":
            # LoRA of rank r in shard form.
            self.equivalent_rank = self.private_rank = self.r
            self.shards_per_vector = 1
        if self.method == "miss_mini" and (self.mini_r is None or self.mini_r < 1):
            raise ValueError("method='miss_mini' needs mini_r >= 1")

    @property
    def scale(self) -> float:
        return 1.0 if self.method in ("miss", "miss_mini") else self.lora_alpha / self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoSConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MoSConfig fields: {sorted(unknown)}")
        return cls(**d)

    # ------------------------------------------------------------------
    def check_type(self, name: str, h: int, o: int, L: int) -> None:
        """Constraints that involve one projection type's dims and layer count."""
        r = self.r
        if self.method == "mos":
            e, p, l = self.equivalent_rank, self.private_rank, self.shards_per_vector
            if h % l or o % l:
                raise ValueError(f"{name}: in-dim {h} and out-dim {o} must be divisible by shards_per_vector={l}")
            P0 = (e - p) * L * l
            if (r - p) * l > P0:
                raise ValueError(f"{name}: (r - p) * l = {(r - p) * l} shared shards per layer exceed the public pool "
                                 f"(e - p) * L * l = {P0} (r={r}, e={e}, p={p}, l={l}, L={L})")
        elif self.method in ("miss", "miss_mini"):
            if h % r:
                raise ValueError(f"{name}: MiSS needs r={r} to divide the in-dim {h}")
            if self.method == "miss_mini" and o % self.mini_r:
                raise ValueError(f"{name}: MiSS mini needs mini_r={self.mini_r} to divide the out-dim {o}")

    def layout(self, h: int, o: int, L: int):
        """(N_A, s_a, l_a, N_B, s_b, l_b) of one type's pools."""
        r = self.r
        if self.method in ("mos", "lora"):
            e, l = self.equivalent_rank, self.shards_per_vector
            n = e * L * l
            return n, h // l, l, n, o // l, l
        if self.method == "miss":
            return r, r, h // r, L * r, o, 1
        mini = self.mini_r
        return r, r, h // r, L * r, mini, o // mini

    def trainable_per_type(self, h: int, o: int, L: int) -> int:
        n_a, s_a, _, n_b, s_b, _ = self.layout(h, o, L)
        a = 0 if self.method in ("miss", "miss_mini") else n_a * s_a
        return a + n_b * s_b


def sample_tables(cfg: MoSConfig, h: int, o: int, L: int, gen: torch.Generator):
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


class ShardPools(nn.Module):
    """The two pools of one projection type, shared by all its layers (registered once)."""

    def __init__(self, cfg: MoSConfig, h: int, o: int, L: int, gen: Optional[torch.Generator] = None,
                 device=None, dtype=torch.float32):
        super().__init__()
        self.h, self.o, self.L = h, o, L
        n_a, s_a, _, n_b, s_b, _ = cfg.layout(h, o, L)
        miss = cfg.method in ("miss", "miss_mini")
        a = torch.empty(n_a, s_a, device=device, dtype=dtype)
        b = torch.empty(n_b, s_b, device=device, dtype=dtype)
        self.A = nn.Parameter(a, requires_grad=not miss)
        self.B = nn.Parameter(b)
        if a.device.type != "meta":
            with torch.no_grad():
                if miss:
                    self.A.copy_(torch.eye(n_a, dtype=dtype))
                else:
                    bound = 1.0 / math.sqrt(h)
                    self.A.copy_((torch.rand(n_a, s_a, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
                self.B.zero_()

    def extra_repr(self) -> str:
        return f"h={self.h}, o={self.o}, L={self.L}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"
