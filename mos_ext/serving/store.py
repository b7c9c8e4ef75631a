"""AdapterStore: many tenants' sharded adapters resident at their compressed size.

For every adapted projection type of one base model the store keeps one stacked pool per
side (``A [R, s_a]``, ``B [R, s_b]``, rows handed out from a free list like S-LoRA's unified
pages, one page = one shard row) and, for every adapted layer, tables
``idx_a [max_tenants, max_rank, l_a]``, ``idx_b [max_tenants, max_rank, l_b]`` of global row
numbers, ``-1`` where a tenant has no rank row. A tenant is a slot; ``sgmv`` reads the slots
named by a batch's segments straight from these tensors (MOS.md §3).

Every adapter kind is converted into the store's shard length on load ("re-sharding"):
MoS pools of shard length ``k * s`` are split into ``k`` rows each, plain LoRA (``l = 1``)
rows likewise, and shorter shards (MiSS's identity, MiSS mini's ``D``) are joined into
composite rows, deduplicated, so that LoRA, MoS and MiSS tenants of any rank mix in one batch.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..adapter_io import AdapterSpec, read_adapter
from ..bases import layer_dims as model_layer_dims
from ..layout import DEFAULT_TARGETS
from .reshard import StorePlan, plan_adapter, plan_layout


class CapacityError(RuntimeError):
    """The store has no room for an adapter (rows or tenant slots); nothing was changed."""


class AdapterStore:
    """Tenants' adapters for one base model on one device.

    Args:
        model: the base model (targeted linear layers are found by ``target_modules``).
        target_modules: last names of the linear modules adapters may touch.
        capacity_bytes: bytes of pool storage; split into the same number of rows for every
            (type, side), which is how MoS and LoRA adapters use them.
        max_tenants: tenant slots. max_rank: the largest rank a tenant may have.
        slots: shards per row of the store (``s_a = h / slots``): the finest MoS split served
            without composite rows; LoRA rows are split into ``slots`` rows.
        dtype, device: of the pools (default: the model's).
    """

    def __init__(self, model: Optional[nn.Module] = None, *, capacity_bytes: int, target_modules=None,
                 max_tenants: int = 256, max_rank: int = 64, slots: int = 8, dtype=None, device=None,
                 layer_dims: Optional[Dict[str, Tuple[int, int]]] = None):
        if (model is None) == (layer_dims is None):
            raise ValueError("AdapterStore needs exactly one of model and layer_dims")
        if model is not None:
            some = next(model.parameters())
            self.device = torch.device(device) if device is not None else some.device
            self.dtype = dtype or (some.dtype if some.is_floating_point() else torch.float32)
        else:  # a serving engine's own layer classes (vLLM): the caller names the layers and their dims
            self.device = torch.device(device if device is not None else "cpu")
            self.dtype = dtype or torch.float32
        self.max_tenants, self.max_rank, self.slots = max_tenants, max_rank, slots
        targets = set(target_modules or DEFAULT_TARGETS)
        self.layers: "OrderedDict[str, str]" = OrderedDict()  # module path -> type key
        self.type_dims: Dict[str, Tuple[int, int]] = {}
        if model is not None:
            found = [(name, h, o) for name, (h, o) in model_layer_dims(model, unwrap=False).items()]
        else:
            found = []
            for name, dims in layer_dims.items():
                try:
                    h, o = (int(d) for d in dims)
                except (TypeError, ValueError):
                    raise ValueError(f"layer_dims[{name!r}] must be (in_features, out_features), got {dims!r}") from None
                found.append((name, h, o))
        for name, h, o in found:
            last = name.rsplit(".", 1)[-1]
            if last not in targets:
                continue
            key = f"{last}:{h}x{o}"
            for d, what in ((h, "in"), (o, "out")):
                if d % slots:
                    raise ValueError(f"{name}: {what}-dim {d} is not divisible by slots={slots}")
            self.layers[name] = key
            self.type_dims[key] = (h, o)
        if not self.layers:
            raise ValueError(f"no module of the model matches target_modules {sorted(targets)}")
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_row = sum((h + o) // slots for h, o in self.type_dims.values()) * elem
        self.rows = int(capacity_bytes // per_row)
        if self.rows < 1:
            raise ValueError(f"capacity_bytes={capacity_bytes} holds no row (one row of every type is {per_row} bytes)")
        self.pool_a = {k: torch.zeros(self.rows, h // slots, dtype=self.dtype, device=self.device)
                       for k, (h, o) in self.type_dims.items()}
        self.pool_b = {k: torch.zeros(self.rows, o // slots, dtype=self.dtype, device=self.device)
                       for k, (h, o) in self.type_dims.items()}
        self.idx_a = {n: torch.full((max_tenants, max_rank, slots), -1, dtype=torch.int32, device=self.device)
                      for n in self.layers}
        self.idx_b = {n: torch.full((max_tenants, max_rank, slots), -1, dtype=torch.int32, device=self.device)
                      for n in self.layers}
        self.scale = torch.zeros(max_tenants, dtype=torch.float32, device=self.device)
        self._free = {(k, side): list(range(self.rows - 1, -1, -1)) for k in self.type_dims for side in "AB"}
        self._tenants: "OrderedDict[str, dict]" = OrderedDict()
        self._free_slots = list(range(max_tenants - 1, -1, -1))
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ queries
    def names(self) -> List[str]:
        return list(self._tenants)

    def __contains__(self, name) -> bool:
        return name in self._tenants

    def slot(self, name: str) -> int:
        try:
            return self._tenants[name]["slot"]
        except KeyError:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {self.names()[:8]}...)") from None

    def info(self, name: str) -> dict:
        t = self._tenants[name]
        return {k: v for k, v in t.items() if k != "rows"}

    def memory_bytes(self, name: Optional[str] = None) -> int:
        """Pool bytes used by one tenant, or by all (tables and free rows not counted)."""
        if name is not None:
            return self._tenants[name]["bytes"]
        return sum(t["bytes"] for t in self._tenants.values())

    def free_rows(self) -> Dict[Tuple[str, str], int]:
        return {k: len(v) for k, v in self._free.items()}

    # ------------------------------------------------------------------ load / unload
    def load(self, name: str, adapter) -> int:
        """Load an adapter as tenant ``name``; returns its slot.

        ``adapter``: anything :func:`mos_ext.read_adapter` reads: a MoS/MiSS/LoRA-as-shards adapter
        directory (``save_pretrained``; format 1 too), a PEFT LoRA or PEFT MiSS directory, a
        ``PeftModel`` holding a MoS adapter, an AdapterSpec, or a plan from :meth:`read`; unsupported
        parts are refused.
        Everything is validated and converted before the store changes; on any error
        (ValueError, CapacityError) the store and every loaded tenant are as before.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("adapter name must be a non-empty string")
        if name in self._tenants:
            raise ValueError(f"adapter {name!r} is already loaded; unload it first")
        plan = self._as_plan(adapter)
        spec = plan.spec
        with self._lock:
            need = plan.rows_needed()
            short = {k: (n, len(self._free[k])) for k, n in need.items() if n > len(self._free[k])}
            if short:
                (k, (n, free)), = list(short.items())[:1]
                raise CapacityError(f"store is full: adapter {name!r} needs {n} rows of {k[0]} {k[1]} but "
                                    f"{free} are free (capacity {self.rows} rows per type); unload a tenant "
                                    f"or build a larger store")
            if not self._free_slots:
                raise CapacityError(f"store is full: all {self.max_tenants} tenant slots are taken")
            slot = self._free_slots.pop()
            taken = {}
            for key, (rows_t, _) in plan.rows.items():
                ids = [self._free[key].pop() for _ in range(rows_t.shape[0])]
                taken[key] = ids
                if ids:
                    pool = self.pool_a[key[0]] if key[1] == "A" else self.pool_b[key[0]]
                    pool[torch.tensor(ids, device=self.device)] = rows_t.to(device=self.device, dtype=self.dtype)
            for path, (ia, ib) in plan.tables.items():
                key = self.layers[path]
                for side, local, dest in (("A", ia, self.idx_a[path]), ("B", ib, self.idx_b[path])):
                    gid = torch.tensor(taken[(key, side)] + [0], dtype=torch.long)  # +[0]: safe for empty
                    glob = torch.where(local >= 0, gid[local.clamp(min=0)], torch.full_like(local, -1))
                    dest[slot].fill_(-1)
                    dest[slot, : glob.shape[0]] = glob.to(device=self.device, dtype=torch.int32)
            self.scale[slot] = spec.scale
            elem = torch.empty((), dtype=self.dtype).element_size()
            nbytes = sum(len(ids) * (self.pool_a[k[0]] if k[1] == "A" else self.pool_b[k[0]]).shape[1] * elem
                         for k, ids in taken.items())
            self._tenants[name] = dict(slot=slot, kind=spec.kind, rank=spec.rank, scale=spec.scale, rows=taken,
                                       bytes=nbytes)
            return slot

    def unload(self, name: str) -> None:
        """Remove a tenant; its rows and slot return to the free lists."""
        with self._lock:
            t = self._tenants.pop(name, None)
            if t is None:
                raise KeyError(f"adapter {name!r} is not loaded")
            slot = t["slot"]
            for path in self.layers:
                self.idx_a[path][slot].fill_(-1)
                self.idx_b[path][slot].fill_(-1)
            self.scale[slot] = 0.0
            for key, ids in t["rows"].items():
                self._free[key].extend(reversed(ids))
            self._free_slots.append(slot)

    # ------------------------------------------------------------------ conversion
    def _plan(self, spec: AdapterSpec) -> StorePlan:
        """Convert an AdapterSpec to store rows and local tables (no store change)."""
        return plan_adapter(spec, self.layers, self.type_dims, self.slots, self.max_rank)

    def read(self, adapter) -> StorePlan:
        """Read and validate ``adapter`` for this store's layers (:func:`mos_ext.read_adapter` with the
        store's layer dims), check that it fits a tenant slot (layers served, rank <= max_rank, shapes)
        and convert it to store rows; nothing changes. ``load(name, plan)`` then neither reads nor
        converts again (the plan holds the adapter's spec and rows: a host copy to reload from)."""
        return self._plan(self._read_spec(adapter))

    def _read_spec(self, adapter) -> AdapterSpec:
        dims = {p: self.type_dims[k] for p, k in self.layers.items()}
        return read_adapter(adapter, dims=dims)

    def _as_plan(self, adapter) -> StorePlan:
        if isinstance(adapter, StorePlan):
            if adapter.layout == plan_layout(self.layers, self.type_dims, self.slots, self.max_rank):
                return adapter
            adapter = adapter.spec  # made for another store layout: convert again
        return self._plan(self._read_spec(adapter))

    def rows_needed(self, adapter) -> Dict[Tuple[str, str], int]:
        """Store rows per (type key, side) that loading ``adapter`` (a plan from :meth:`read`, or
        anything ``load`` takes) takes."""
        return self._as_plan(adapter).rows_needed()

    def table_bytes_per_tenant(self) -> int:
        """Bytes of int32 index tables one tenant slot holds (all layers, both sides)."""
        return sum(self.idx_a[p][0].numel() + self.idx_b[p][0].numel() for p in self.layers) * 4
