"""The hyper-parameters of a sharded adapter and the pool layout they define (MOS.md §2), without PEFT.

:class:`MoSHyper` is plain data plus the layout arithmetic; :class:`mos_ext.config.MoSConfig` is the
same fields as a ``peft.PeftConfig``. The adapter reader and the serving store use this module, so
they work where peft is not installed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

METHODS = ("mos", "lora", "miss", "miss_mini")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Embedding and output-head module names: adapters on them are not supported (refused when an
# adapter is created and when one is read; PEFT would also save their base weights).
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embeddings", "embed_in", "lm_head", "embed_out")

# The on-disk layout written by save_pretrained (bumped when keys or semantics change).
FORMAT_VERSION = 2

# The fields PEFT's own PeftConfig adds to a saved adapter_config.json (peft 0.18 - 0.21); a format-2
# file may hold these besides the MoS fields.
PEFT_CONFIG_FIELDS = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                      "inference_mode")


@dataclass
class MoSHyper:
    """Hyper-parameters of a sharded adapter (MoS by default; ``method`` picks LoRA or MiSS).

    r: rank of each layer's adapter. equivalent_rank (e): the LoRA rank with the same number of
    trainable parameters (sets the pool size). shards_per_vector (l): shards per row of A /
    column of B. private_rank (p): rank rows private to each layer. lora_alpha: scale =
    lora_alpha / r (MiSS: 1). lora_dropout: dropout on the adapter input. target_modules: module
    names (suffix match, a regex string, or ``"all-linear"``, as in PEFT). tie_indices: ablation,
    B uses A's table (no pair dissociation). seed: seeds the index tables and the init. mini_r:
    MiSS mini's shard length of D. deterministic: pool gradients reduced in a fixed order
    (bitwise reproducible run to run). type_layers: filled in when the adapter is injected: the
    module paths of each projection type's layers, in pool order (saved with the adapter and
    checked on load).
    """
    r: int = field(default=8, metadata={"help": "rank of each layer's adapter"})
    equivalent_rank: int = field(default=2, metadata={"help": "LoRA rank with the same trainable-parameter count"})
    shards_per_vector: int = field(default=4, metadata={"help": "shards per row of A / column of B (l)"})
    private_rank: int = field(default=1, metadata={"help": "rank rows private to each layer (p)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "scale = lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: Optional[Union[List[str], str]] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int = field(default=0, metadata={"help": "seed of the index tables and the init"})
    tie_indices: bool = field(default=False, metadata={"help": "ablation: B uses A's index table"})
    method: str = field(default="mos", metadata={"help": "one of mos, lora, miss, miss_mini"})
    mini_r: Optional[int] = field(default=None, metadata={"help": "MiSS mini: shard length of D"})
    deterministic: bool = field(default=False, metadata={"help": "fixed-order pool-gradient reduction"})
    type_layers: Optional[Dict[str, List[str]]] = field(default=None, metadata={"help": "filled at injection"})
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self):
        self.check_hyper()

    def check_hyper(self) -> None:
        """Refuse inconsistent hyper-parameters (ValueError naming them); normalizes target_modules and,
        for ``method="lora"``, the derived fields."""
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module type")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"MoSConfig format_version {self.format_version} is not supported (this mos_ext reads "
                             f"{FORMAT_VERSION}; a format-1 directory holds adapter.safetensors and is read by "
                             f"mos_ext.import_adapter)")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not math.isfinite(float(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be finite, got {self.lora_alpha}")
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

    @classmethod
    def from_dict(cls, d: dict) -> "MoSHyper":
        """Build from a plain dict of hyper-parameters (format 1's "config"), refusing unknown keys."""
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
