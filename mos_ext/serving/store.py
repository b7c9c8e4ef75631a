"""AdapterStore: many tenants' sharded adapters resident at their compressed size.

For every adapted projection type of one base model the store keeps one stacked pool per
side (``A [R, s_a]``, ``B [R, s_b]``, rows handed out like S-LoRA's unified pages, one page =
one shard row) and, for every adapted layer, *shared* tables ``idx_a [1 + max_tables, max_rank,
l_a]``, ``idx_b [...]`` (``docs/OPS.md`` "Shared tables"). A tenant is a slot ``t``; its row of
the per-type maps ``map_a[type] [max_tenants, 2]``, ``map_b[type]`` names its table ``u`` and the
first row of its run of pool rows (its *base*): its shard ``p`` is pool row ``base + p``. Tenants
whose tables are equal (one recipe and seed: the common case when a service trains many tenants
alike, and every plain LoRA of one rank) hold one table between them, so a tenant costs its pool
rows plus 8 bytes of map per (type, side) and 4 of scale. Table 0 is the empty table (every
entry ``-1``): free slots point at it. A tenant whose rows cannot be one run (a fragmented
store) gets rows wherever they are free and a table of its own with global rows and base 0.
``sgmv`` reads the slots named by a batch's segments straight from these tensors (MOS.md §3).

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
from ..batch import SgmvSlice
from ..bases import layer_dims as model_layer_dims
from ..layout import DEFAULT_TARGETS
from .reshard import StorePlan, plan_adapter, plan_layout


class CapacityError(RuntimeError):
    """The store has no room for an adapter (rows or tenant slots); nothing was changed."""


class _Rows:
    """Free rows of one (type, side) pool as sorted runs ``[start, end)``: a tenant takes one
    run of its rows when one is long enough (first fit), else rows from several runs."""

    def __init__(self, n: int):
        self.runs: List[List[int]] = [[0, n]] if n > 0 else []

    def __len__(self) -> int:
        return sum(e - s for s, e in self.runs)

    def take_run(self, n: int) -> Optional[int]:
        """First row of a run of ``n`` rows now taken, or ``None`` when no free run is that long."""
        for run in self.runs:
            if run[1] - run[0] >= n:
                start = run[0]
                run[0] += n
                if run[0] == run[1]:
                    self.runs.remove(run)
                return start
        return None

    def take_any(self, n: int) -> List[int]:
        """``n`` rows (the caller checked ``len(self) >= n``), lowest first."""
        ids: List[int] = []
        while len(ids) < n:
            run = self.runs[0]
            k = min(n - len(ids), run[1] - run[0])
            ids.extend(range(run[0], run[0] + k))
            run[0] += k
            if run[0] == run[1]:
                self.runs.pop(0)
        return ids

    def give(self, ids: List[int]) -> None:
        """Rows back to the free runs (merged with their neighbours)."""
        if not ids:
            return
        pts = sorted(ids)
        new, s0, prev = [], pts[0], pts[0]
        for p in pts[1:]:
            if p != prev + 1:
                new.append([s0, prev + 1])
                s0 = p
            prev = p
        new.append([s0, prev + 1])
        merged: List[List[int]] = []
        for run in sorted(self.runs + new):
            if merged and run[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], run[1])
            else:
                merged.append(list(run))
        self.runs = merged


class AdapterStore:
    """Tenants' adapters for one base model on one device.

    Args:
        model: the base model (targeted linear layers are found by ``target_modules``).
        target_modules: last names of the linear modules adapters may touch.
        capacity_bytes: bytes of pool storage; split into the same number of rows for every
            (type, side), which is how MoS and LoRA adapters use them.
        max_tenants: tenant slots. max_rank: the largest rank a tenant may have.
        max_tables: distinct tables held at once (default ``max_tenants``: every tenant may
            bring its own). Tenants with equal tables share one, so a service whose tenants come
            from a few recipes sets this to a few and saves ``max_tenants - max_tables`` tables
            (:meth:`table_bytes` each: 2.2% of a MoS e=2 tenant at LLaMA-2-7B fp16).
        slots: shards per row of the store (``s_a = h / slots``): the finest MoS split served
            without composite rows; LoRA rows are split into ``slots`` rows.
        dtype, device: of the pools (default: the model's).
    """

    def __init__(self, model: Optional[nn.Module] = None, *, capacity_bytes: int, target_modules=None,
                 max_tenants: int = 256, max_rank: int = 64, slots: int = 8, dtype=None, device=None,
                 layer_dims: Optional[Dict[str, Tuple[int, int]]] = None, max_tables: Optional[int] = None):
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
        self._elem = torch.empty((), dtype=self.dtype).element_size()
        per_row = sum((h + o) // slots for h, o in self.type_dims.values()) * self._elem
        self.rows = int(capacity_bytes // per_row)
        if self.rows < 1:
            raise ValueError(f"capacity_bytes={capacity_bytes} holds no row (one row of every type is {per_row} bytes)")
        self.pool_a = {k: torch.zeros(self.rows, h // slots, dtype=self.dtype, device=self.device)
                       for k, (h, o) in self.type_dims.items()}
        self.pool_b = {k: torch.zeros(self.rows, o // slots, dtype=self.dtype, device=self.device)
                       for k, (h, o) in self.type_dims.items()}
        self.max_tables = int(max_tables if max_tables is not None else max_tenants)
        if self.max_tables < 1:
            raise ValueError(f"max_tables must be >= 1, got {max_tables}")
        nt = self.max_tables + 1  # table 0: the empty table
        self.idx_a = {n: torch.full((nt, max_rank, slots), -1, dtype=torch.int32, device=self.device)
                      for n in self.layers}
        self.idx_b = {n: torch.full((nt, max_rank, slots), -1, dtype=torch.int32, device=self.device)
                      for n in self.layers}
        # per (type, side): row t = (table, row base) of tenant slot t; free slots read table 0
        self.map_a = {k: torch.zeros(max_tenants, 2, dtype=torch.int32, device=self.device) for k in self.type_dims}
        self.map_b = {k: torch.zeros(max_tenants, 2, dtype=torch.int32, device=self.device) for k in self.type_dims}
        self.scale = torch.zeros(max_tenants, dtype=torch.float32, device=self.device)
        self._free = {(k, side): _Rows(self.rows) for k in self.type_dims for side in "AB"}
        self._tenants: "OrderedDict[str, dict]" = OrderedDict()
        self._free_slots = list(range(max_tenants - 1, -1, -1))
        self._tables: Dict[object, dict] = {}  # key -> {"u": table, "refs": tenants}
        self._free_tables = list(range(self.max_tables, 0, -1))
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
        return {k: v for k, v in t.items() if k not in ("rows", "table")}

    def memory_bytes(self, name: Optional[str] = None) -> int:
        """Pool bytes used by one tenant, or by all (tables, maps and free rows not counted)."""
        if name is not None:
            return self._tenants[name]["bytes"]
        return sum(t["bytes"] for t in self._tenants.values())

    def table_bytes(self) -> int:
        """Bytes of one table (all layers, both sides, int32): what a tenant with a table of its
        own costs beyond its pools; tenants with equal tables hold one between them."""
        return sum(self.idx_a[p][0].numel() + self.idx_b[p][0].numel() for p in self.layers) * 4

    def slot_bytes(self) -> int:
        """Bytes every tenant slot holds whatever its tables: its map rows (int32 table and base
        per type and side) and its float32 scale."""
        return len(self.type_dims) * 2 * 2 * 4 + 4

    def tenant_bytes(self, name: str) -> float:
        """Every device byte one tenant costs: its pool rows, its slot (:meth:`slot_bytes`) and
        its share of its table (:meth:`table_bytes` over the tenants holding that table)."""
        t = self._tenants[name]
        return t["bytes"] + self.slot_bytes() + self.table_bytes() / self._tables[t["table"]]["refs"]

    def tables_in_use(self) -> int:
        """Distinct tables held now (the empty table 0 not counted)."""
        return len(self._tables)

    def pool_bytes(self) -> int:
        """Device bytes of the store's pools, used rows and free ones."""
        return sum(self.pool_a[k].numel() + self.pool_b[k].numel() for k in self.type_dims) * self._elem

    def allocated_bytes(self) -> int:
        """Device bytes the store allocated: pools, ``1 + max_tables`` tables, maps and scales."""
        return self.pool_bytes() + (self.max_tables + 1) * self.table_bytes() + self.max_tenants * self.slot_bytes()

    def _pool(self, key: Tuple[str, str]) -> torch.Tensor:
        """The pool of a (type key, side)."""
        return self.pool_a[key[0]] if key[1] == "A" else self.pool_b[key[0]]

    def free_rows(self) -> Dict[Tuple[str, str], int]:
        return {k: len(v) for k, v in self._free.items()}

    def sgmv_slice(self, path: str, off: int = 0, size: Optional[int] = None) -> SgmvSlice:
        """The ``sgmv`` operands of layer ``path`` (pools, shared tables, maps) for output columns
        ``[off, off + size)`` (default: the layer's whole output)."""
        key = self.layers[path]
        return SgmvSlice(self.pool_a[key], self.pool_b[key], self.idx_a[path], self.idx_b[path], off,
                         self.type_dims[key][1] if size is None else size, self.map_a[key], self.map_b[key])

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
            # rows: one run per (type, side) where the free rows allow (base = its first row), else
            # rows from several runs, numbered in a table of the tenant's own (base 0)
            taken, bases = {}, {}
            for key, (rows_t, _) in plan.rows.items():
                n = rows_t.shape[0]
                start = self._free[key].take_run(n) if n else 0
                if start is not None:
                    taken[key], bases[key] = list(range(start, start + n)), start
                else:
                    taken[key], bases[key] = self._free[key].take_any(n), None
            tkey = plan.table_key() if all(b is not None for b in bases.values()) else object()
            shared = self._tables.get(tkey)
            if shared is None and not self._free_tables:
                for key, ids in taken.items():
                    self._free[key].give(ids)
                raise CapacityError(f"store is full: adapter {name!r} needs a table of its own and all "
                                    f"{self.max_tables} tables (max_tables) hold other tenants' tables; unload a "
                                    f"tenant or build the store with a larger max_tables")
            slot = self._free_slots.pop()
            for key, (rows_t, _) in plan.rows.items():
                ids, base = taken[key], bases[key]
                if not ids:
                    continue
                pool = self._pool(key)
                rows_t = rows_t.to(device=self.device, dtype=self.dtype)
                if base is not None:
                    pool[base:base + len(ids)].copy_(rows_t)
                else:
                    pool[torch.tensor(ids, device=self.device)] = rows_t
            if shared is None:
                u = self._free_tables.pop()
                shared = self._tables[tkey] = dict(u=u, refs=0)
                for path, (ia, ib) in plan.tables.items():
                    key = self.layers[path]
                    for side, local, dest in (("A", ia, self.idx_a[path]), ("B", ib, self.idx_b[path])):
                        if bases[(key, side)] is None:  # global rows of a table of its own
                            gid = torch.tensor(taken[(key, side)] + [0], dtype=torch.long)  # +[0]: safe for empty
                            local = torch.where(local >= 0, gid[local.clamp(min=0)], torch.full_like(local, -1))
                        dest[u].fill_(-1)
                        dest[u, : local.shape[0]] = local.to(device=self.device, dtype=torch.int32)
            shared["refs"] += 1
            u = shared["u"]
            for k in self.type_dims:
                for side, m in (("A", self.map_a[k]), ("B", self.map_b[k])):
                    base = bases.get((k, side))
                    m[slot] = torch.tensor([u, base or 0], dtype=torch.int32)
            self.scale[slot] = spec.scale
            nbytes = sum(len(ids) * self._pool(k).shape[1] * self._elem for k, ids in taken.items())
            self._tenants[name] = dict(slot=slot, kind=spec.kind, rank=spec.rank, scale=spec.scale, rows=taken,
                                       bytes=nbytes, table=tkey, table_slot=u, shared_table=isinstance(tkey, bytes))
            return slot

    def unload(self, name: str) -> None:
        """Remove a tenant; its rows and slot return to the free lists (its table too when no
        other tenant holds it)."""
        with self._lock:
            t = self._tenants.pop(name, None)
            if t is None:
                raise KeyError(f"adapter {name!r} is not loaded")
            slot = t["slot"]
            for k in self.type_dims:
                self.map_a[k][slot].zero_()  # table 0, the empty table
                self.map_b[k][slot].zero_()
            self.scale[slot] = 0.0
            shared = self._tables[t["table"]]
            shared["refs"] -= 1
            if shared["refs"] == 0:
                del self._tables[t["table"]]
                for path in self.layers:
                    self.idx_a[path][shared["u"]].fill_(-1)
                    self.idx_b[path][shared["u"]].fill_(-1)
                self._free_tables.append(shared["u"])
            for key, ids in t["rows"].items():
                self._free[key].give(ids)
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
            if not adapter.spec.layers:
                raise ValueError("a detached plan (StorePlan.detached) loads only into a store of the layout it was "
                                 "made for; read the adapter again for this store")
            adapter = adapter.spec  # made for another store layout: convert again
        return self._plan(self._read_spec(adapter))

    def rows_needed(self, adapter) -> Dict[Tuple[str, str], int]:
        """Store rows per (type key, side) that loading ``adapter`` (a plan from :meth:`read`, or
        anything ``load`` takes) takes."""
        return self._as_plan(adapter).rows_needed()

