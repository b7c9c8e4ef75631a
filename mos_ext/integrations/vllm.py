"""vLLM plugin: serve mos_ext adapters (MoS, MiSS, LoRA-as-shards) and PEFT LoRA / MiSS adapters
inside vLLM 0.32.x / 0.34.x, held at their compressed size in an :class:`~mos_ext.serving.AdapterStore`.

Installing mos_ext into a vLLM environment registers :func:`register` under the
``vllm.general_plugins`` entry point; vLLM calls it once in every process (API server, engine
core, worker). ``MOS_EXT_VLLM_PLUGIN=0`` switches it off (vLLM then runs unchanged).

What changes, and why each patch is needed (vLLM offers no public hook for any of them; all
patches live here and nowhere else):

* ``WorkerLoRAManager._load_adapter`` (worker): an adapter directory that
  :func:`mos_ext.read_adapter` reads (mos_ext formats 1 and 2, PEFT LoRA, PEFT MiSS) is loaded
  into the worker's store — pools as store rows, int32 tables per layer — and vLLM gets an empty
  ``LoRAModel`` (no dense weights) so its scheduler and slot bookkeeping work unchanged.
* ``LoRAModelManager.set_adapter_mapping`` (worker, once per step): the batch's token -> adapter
  mapping becomes ``sgmv`` segments (runs of tokens with the same tenant, ``-1`` for base
  tokens), built once and shared by every layer; evicted tenants of the batch are reloaded.
* ``BaseLinearLayerWithLoRA._apply_lora_to_output`` (worker, every adapted linear layer): the
  adapter math is one ``sgmv`` per output slice (``mos_ext.batch.add_sgmv``) (packed q/k/v and gate/up are
  sliced) instead of vLLM's punica ops, so base rows stay untouched whatever the slots hold
  (vLLM 0.32's CPU ops apply the last slot to ``-1`` rows when all slots are full).
* ``BaseLinearLayerWithLoRA._apply_async_impl`` (worker, ``VLLM_LORA_ENABLE_DUAL_STREAM``): the
  dual-stream path calls vLLM's punica ops directly, never ``_apply_lora_to_output``; the store's
  delta is added after vLLM joins its streams (its slots hold zeros for store tenants).
* ``WorkerLoRAManager.remove_adapter`` (worker) and ``OpenAIServingModels.unload_lora_adapter`` (API
  server): an unload also calls the engine's ``remove_lora`` (vLLM only forgets the name), which
  reaches every worker; the store frees the adapter's rows and host copy at once.
* ``OpenAIServingModels.load_lora_adapter`` (API server): a load refused by mos_ext (corrupt or
  mismatched adapter, rank or size beyond the store's capacity) answers HTTP 400 naming the
  problem instead of vLLM's generic 500.
* ``MultiprocExecutor.collective_rpc`` (engine core, TP > 1): when a blocking call to every worker fails,
  vLLM raises at the first failed answer and leaves the other ranks' answers queued, so the next
  ``add_lora`` / ``remove_lora`` reads a stale answer (a good load refused with an earlier bad one's
  message, an unload answered 500); the answers left are read before the error goes on.

The store is bounded by bytes: when a new adapter does not fit, least recently used tenants
that no current adapter slot holds are evicted, kept in host memory at their compressed size, and
reloaded when a request names them again (as vLLM's own LRU does with its CPU cache). Each adapter
may use at most 1/``--max-loras`` of every pool, so the adapters of any batch fit together and a
reload never fails. Settings (environment of the server):

* ``MOS_EXT_VLLM_CAPACITY_MB`` pool bytes of the store (default 256)
* ``MOS_EXT_VLLM_MAX_TENANTS`` tenants resident at once (tenant slots; default 256)
* ``MOS_EXT_VLLM_MAX_TABLES`` distinct index tables held at once (default: the tenant slots);
  tenants with equal tables (one recipe and seed, or plain LoRAs of one rank) share one
* ``MOS_EXT_VLLM_MAX_RANK`` largest adapter rank (default: vLLM's ``--max-lora-rank``)
* ``MOS_EXT_VLLM_SLOTS`` shards per row of the store (default 8)

Tensor parallelism: each rank's store holds its share of every adapter (:mod:`.tp_shard`): column-parallel
layers keep A whole and B cut to the rank's output features, row-parallel ones A cut to the rank's input
features and B whole (the partial delta rides the base layer's all-reduce). Each load/unload/eviction logs
one ``mos_ext store ...`` line per worker (resident tenants, bytes used/free, evictions, host copies).

Supported: vLLM 0.32.x and 0.34.x (patch points in :mod:`.vllm_points`, checked in CI against each
version's source), any tensor parallel size vLLM accepts (not ``--fully-sharded-loras``), models whose
vLLM module names are the HF ones (Llama-style: ``qkv_proj`` packs ``q/k/v_proj``, ``gate_up_proj``
packs ``gate/up_proj``).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from ..adapter_io import adapter_kind, read_adapter
from ..batch import Segments, add_sgmv, build_segments
from ..serving import AdapterStore, CapacityError
from ..settings import set_index_checks
from .tp_shard import shard_spec
from .vllm_points import CHECKED, SERVED_CLASSES, SUPPORTED, supported

ENV_SWITCH = "MOS_EXT_VLLM_PLUGIN"
ERROR_PREFIX = "mos_ext refused adapter"
SHELL_MODULE = "__mos_ext_store__"

_patched = False
_patch_lock = threading.Lock()


class MoSAdapterError(ValueError):
    """An adapter the worker's store cannot take; the message names the problem."""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def check_version(version: str) -> None:
    """Raise a RuntimeError naming ``version`` unless it is a vLLM this plugin was tested with."""
    if not supported(version):
        names = ", ".join(p + "x" for p in SUPPORTED)
        checked = ", ".join(CHECKED.values())
        raise RuntimeError(
            f"mos_ext's vLLM plugin supports vLLM {names} (patch points checked against {checked}); "
            f"this is vLLM {version}. "
            f"It patches vLLM-internal LoRA classes that change between versions, so it refuses to start. "
            f"Set {ENV_SWITCH}=0 to run vLLM without it (mos_ext adapters are then not served).")


def _env_number(name: str, default, kind):
    """A positive number from the environment (``kind`` int or float), ``default`` when unset."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if not v > 0:
        raise ValueError(f"{name} must be {'>= 1' if kind is int else '> 0'}, got {v}")
    return v


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int)


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float)


def is_mos_readable(path) -> bool:
    """True when ``path`` is an adapter directory that mos_ext serves (by its config's kind only;
    the contents are validated by the store on load)."""
    return adapter_kind(path) in ("mos", "mos_v1", "lora", "miss")


# ---------------------------------------------------------------------------------------- runtime
def _served_layers(manager):
    """vLLM's adapted linear modules as the store sees them: ({hf path: (in, out)} of every output slice
    on this rank, {vLLM module: [(hf path, offset, size)]}, the base weights' dtype or None, {hf path:
    (in, out)} of the whole layer, {hf path: (side, start, features)} of this rank's range (TP > 1))."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    packed = dict(getattr(manager, "packed_modules_mapping", {}) or {})
    layer_dims: Dict[str, Tuple[int, int]] = {}
    full_dims: Dict[str, Tuple[int, int]] = {}
    ranges: Dict[str, Tuple[str, int, int]] = {}
    layer_slices: Dict[str, List[Tuple[str, int, int]]] = {}
    dtype = None
    for name, module in manager.modules.items():
        slices = getattr(module, "output_slices", None)
        if not isinstance(module, BaseLinearLayerWithLoRA) or slices is None:
            continue  # embeddings, logits, MoE: not served from the store
        cls = type(module).__name__
        tp = int(getattr(module, "tp_size", 1))
        if cls not in SERVED_CLASSES:
            if tp == 1 and type(module).apply is BaseLinearLayerWithLoRA.apply:
                kind = "replicated"  # an unsharded subclass on the base class's paths
            else:
                why = (" (--fully-sharded-loras: its sharded LoRA layers compute outside the hooked path; "
                       "serve without it)" if "Sharded" in cls else "")
                raise MoSAdapterError(f"{ERROR_PREFIX}s: {name} is a {cls}, a vLLM LoRA layer the mos_ext plugin "
                                      f"does not serve{why}")
        else:
            kind = SERVED_CLASSES[cls][1]
        parent, _, leaf = name.rpartition(".")
        subs = packed.get(leaf, [leaf])
        if len(subs) != len(slices):
            continue
        base = module.base_layer
        if tp > 1 and kind == "column" and len(subs) == 1 and cls != "ColumnParallelLinearWithLoRA":
            raise MoSAdapterError(f"{ERROR_PREFIX}s: {name} ({cls}) packs several projections into one LoRA slice; "
                                  f"its tensor-parallel split is not served")
        ids = getattr(module, "output_ids", None) or (int(getattr(module, "tp_rank", 0)),) * len(subs)
        full_out = list(getattr(base, "output_sizes", None) or [int(getattr(base, "output_size", sum(slices)))])
        if hasattr(base, "total_num_kv_heads") and len(subs) == 3:  # q/k/v: KV heads may be replicated over ranks
            hs = int(base.head_size)
            full_out = [int(base.total_num_heads) * hs, int(base.total_num_kv_heads) * hs,
                        int(base.total_num_kv_heads) * int(getattr(base, "v_head_size", hs))]
        off, entries = 0, []
        for i, (sub, size) in enumerate(zip(subs, slices)):
            path = f"{parent}.{sub}" if parent else sub
            size = int(size)
            layer_dims[path] = (int(module.input_size), size)
            full_dims[path] = (int(module.input_size), size)
            if tp > 1 and kind == "column":
                full_dims[path] = (int(module.input_size), int(full_out[i]))
                if int(full_out[i]) != size:
                    ranges[path] = ("B", int(ids[i]) * size, size)
            elif tp > 1 and kind == "row":
                whole = int(base.input_size)
                full_dims[path] = (whole, size)
                if whole != int(module.input_size):
                    ranges[path] = ("A", int(module.tp_rank) * int(module.input_size), int(module.input_size))
            entries.append((path, off, size))
            off += size
        layer_slices[name] = entries
        if dtype is None:
            w = getattr(module.base_layer, "weight", None)
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                dtype = w.dtype
    return layer_dims, layer_slices, dtype, full_dims, ranges


class _Tenants:
    """vLLM adapter ids resident in the store, least recently used first, with a host copy of each
    adapter ever loaded (its store plan) to reload an evicted one from.

    A batch holds at most ``max_loras`` distinct adapters; if each may take at most 1/``max_loras`` of
    every pool, the adapters of any batch fit together, so a tenant evicted for room can always come
    back (from the host copy, never from its directory), and no request is served without its adapter.
    """

    def __init__(self, store, max_loras: int, pinned, full_dims=None, ranges=None, where=""):
        self.store = store
        self.full_dims = full_dims  # TP > 1: adapters are read for the whole layers, then cut to this rank's share
        self.ranges = ranges or {}
        self.where = where
        self.evictions = 0
        self.max_loras = int(max_loras)
        self._pinned = pinned  # () -> ids vLLM's slots hold now (never evicted)
        if store.max_tenants < self.max_loras:
            raise MoSAdapterError(f"{ERROR_PREFIX}s: MOS_EXT_VLLM_MAX_TENANTS={store.max_tenants} is below "
                                  f"--max-loras {self.max_loras}: one batch's adapters would not fit")
        if store.max_tables < self.max_loras:
            raise MoSAdapterError(f"{ERROR_PREFIX}s: MOS_EXT_VLLM_MAX_TABLES={store.max_tables} is below "
                                  f"--max-loras {self.max_loras}: one batch's adapters may need that many tables")
        self.plans: Dict[int, object] = {}  # vLLM lora id -> its store plan, in host memory (reload source)
        self.paths: Dict[int, Tuple[str, str]] = {}  # vLLM lora id -> (name, directory)
        self.lru: "OrderedDict[int, None]" = OrderedDict()  # resident ids, oldest first
        self.lock = threading.RLock()

    @staticmethod
    def key(lora_id: int) -> str:
        return f"vllm-{int(lora_id)}"

    def load(self, lora_id: int, name: str, path: str, *, replace: bool, pinned=()) -> int:
        """Load ``path`` as vLLM adapter ``lora_id``; returns its rank. Evicts LRU tenants for room."""
        with self.lock:
            plan = self.prepare(lora_id, name, path, replace=replace)
            return self.store.info(self.key(lora_id))["rank"] if plan is None else \
                self.commit(lora_id, name, path, plan, pinned=pinned)

    def prepare(self, lora_id: int, name: str, path: str, *, replace: bool):
        """Phase 1 of a load, nothing changed: the adapter's plan for this worker's store (read,
        validated, converted, checked against the share bound), or ``None`` when it is resident
        and not replaced. Raises :class:`MoSAdapterError` naming the problem."""
        with self.lock:
            key = self.key(lora_id)
            if key in self.store and not replace:
                self.lru.move_to_end(lora_id)
                self.paths[lora_id] = (name, path)
                return None
            if not replace and lora_id in self.plans:  # evicted earlier: back from the host copy
                plan = self.plans[lora_id]
            else:
                try:
                    plan = self.store.read(self._share(path))  # read, validated and converted once
                except (ValueError, TypeError, KeyError, OSError) as e:
                    raise MoSAdapterError(f"{ERROR_PREFIX} {name!r} at {path}: {e}") from None
            self._check_share(plan, name, path)
            return plan

    def commit(self, lora_id: int, name: str, path: str, plan, *, pinned=()) -> int:
        """Phase 2: the plan goes into the store (an in-place reload replaces the old contents),
        evicting least recently used tenants for room. Cannot fail for room once :meth:`prepare`
        passed (each adapter takes at most 1/max_loras of every pool); if it ever does, the old
        contents are put back (a reload) and the error is raised."""
        with self.lock:
            key = self.key(lora_id)
            before = self.state(lora_id)
            if key in self.store:  # in-place reload: the new contents replace the old ones
                self.store.unload(key)
                self.lru.pop(lora_id, None)
            try:
                self._fit(key, plan, name, path, (set(self._pinned()) | set(pinned)) - {lora_id})
            except MoSAdapterError:
                self.revert(lora_id, *before)
                raise
            self.lru[lora_id] = None
            self.paths[lora_id] = (name, path)
            self.plans[lora_id] = plan.detached()  # the host copy: rows and tables only, at this rank's size
            self.log_stats(f"loaded {name!r}")
            return plan.rank

    def state(self, lora_id: int) -> tuple:
        """What this worker holds of adapter ``lora_id``, for :meth:`revert`: (resident, host copy, (name, dir))."""
        return self.key(lora_id) in self.store, self.plans.get(lora_id), self.paths.get(lora_id)

    def revert(self, lora_id: int, resident: bool, old_plan, old_path) -> None:
        """Back to a :meth:`state` taken before a load (which failed here, or committed here and failed on
        another rank): the previous contents resident, the host copy only (an evicted adapter), or
        nothing (a new one)."""
        with self.lock:
            key = self.key(lora_id)
            if key in self.store:
                self.store.unload(key)
            self.lru.pop(lora_id, None)
            for d, v in ((self.plans, old_plan), (self.paths, old_path)):
                if v is None:
                    d.pop(lora_id, None)
                else:
                    d[lora_id] = v
            if resident and old_plan is not None:
                self._fit(key, old_plan, old_path[0], old_path[1], set(self._pinned()) - {lora_id})
                self.lru[lora_id] = None

    def _fit(self, key, plan, name, path, keep) -> None:
        while True:
            try:
                self.store.load(key, plan)
                return
            except CapacityError as e:
                victim = next((i for i in self.lru if i not in keep), None)
                if victim is None:
                    raise MoSAdapterError(f"{ERROR_PREFIX} {name!r} at {path}: beyond the store's capacity even "
                                          f"with every evictable tenant evicted: {e} (raise "
                                          f"MOS_EXT_VLLM_CAPACITY_MB / MOS_EXT_VLLM_MAX_TENANTS / "
                                          f"MOS_EXT_VLLM_MAX_TABLES)") from None
                self.store.unload(self.key(victim))
                self.lru.pop(victim)
                self.evictions += 1
                _log().info("mos_ext: evicted adapter %r (least recently used) to make room for %r; it reloads "
                            "from its host copy when requested", self.paths[victim][0], name)

    def _share(self, path: str):
        """What this worker reads: the directory (TP 1), or this rank's share of the adapter (TP > 1)."""
        if not self.ranges:
            return path
        return shard_spec(read_adapter(path, dims=self.full_dims), self.ranges)

    def forget(self, lora_id: int) -> bool:
        """vLLM removed adapter ``lora_id`` (``/v1/unload_lora_adapter``): free its rows and drop its host copy."""
        with self.lock:
            known = lora_id in self.paths
            name = self.paths.get(lora_id, (str(lora_id), ""))[0]
            if self.key(lora_id) in self.store:
                self.store.unload(self.key(lora_id))
            self.lru.pop(lora_id, None)
            self.plans.pop(lora_id, None)
            self.paths.pop(lora_id, None)
            if known:
                self.log_stats(f"unloaded {name!r}")
            return known

    def stats(self) -> dict:
        """Resident tenants, pool bytes used / free, evictions to host, host copies (this worker)."""
        st = self.store
        total, used = st.pool_bytes(), st.memory_bytes()
        return dict(resident=len(st.names()), names=[self.paths[i][0] for i in self.lru if i in self.paths],
                    used_bytes=used, free_bytes=total - used, pool_bytes=total,
                    tables=st.tables_in_use(), table_bytes=st.tables_in_use() * st.table_bytes(),
                    allocated_bytes=st.allocated_bytes(), evictions=self.evictions,
                    host_copies=len(self.plans))

    def log_stats(self, what: str) -> None:
        s = self.stats()
        _log().info("mos_ext store%s: %s; resident=%d used_bytes=%d free_bytes=%d pool_bytes=%d tables=%d "
                    "table_bytes=%d evictions=%d host_copies=%d tenants=%s", self.where, what, s["resident"],
                    s["used_bytes"], s["free_bytes"], s["pool_bytes"], s["tables"], s["table_bytes"], s["evictions"],
                    s["host_copies"], ",".join(s["names"]))

    def _check_share(self, plan, name: str, path: str) -> None:
        need = plan.rows_needed()
        rows = self.store.rows
        over = {k: n for k, n in need.items() if n > rows}
        if over:  # larger than the whole store: refuse without evicting anyone
            (typ, side), n = next(iter(over.items()))
            raise MoSAdapterError(f"{ERROR_PREFIX} {name!r} at {path}: it needs {n} store rows of {typ} side {side}, "
                                  f"more than the store's whole capacity of {rows} rows per type "
                                  f"(raise MOS_EXT_VLLM_CAPACITY_MB)")
        share = rows // self.max_loras
        over = {k: n for k, n in need.items() if n > share}
        if over:  # would not fit beside max_loras - 1 others in one batch
            (typ, side), n = next(iter(over.items()))
            raise MoSAdapterError(f"{ERROR_PREFIX} {name!r} at {path}: it needs {n} store rows of {typ} side {side}; "
                                  f"with --max-loras {self.max_loras} an adapter may use at most {share} of the "
                                  f"store's capacity of {rows} rows per type, so that any batch's "
                                  f"adapters fit together (raise MOS_EXT_VLLM_CAPACITY_MB or lower --max-loras)")

    def slots_for_step(self, ids) -> Dict[int, int]:
        """Reload the step's evicted adapters, mark them used; {lora id: store slot, -1 if not ours}."""
        with self.lock:
            for i in ids:  # a tenant evicted for room comes back from its host copy
                if self.key(i) not in self.store and i in self.paths:
                    name, path = self.paths[i]
                    # cannot fail for room (each adapter <= capacity / max_loras) nor for files (host copy);
                    # if it ever did, raise: serving the requests without their adapter would be silently wrong
                    self.load(i, name, path, replace=False, pinned=ids)
                if i in self.lru:
                    self.lru.move_to_end(i)
            return {i: self.store.slot(self.key(i)) if self.key(i) in self.store else -1 for i in ids}


class _Runtime:
    """One vLLM worker's store: its tenants, and this step's segments applied by every adapted layer."""

    def __init__(self, manager):
        self.manager = manager
        layer_dims, self.layer_slices, dtype, full_dims, ranges = _served_layers(manager)
        cfg = manager.lora_config
        self.store = AdapterStore(
            layer_dims=layer_dims,
            target_modules=sorted({p.rsplit(".", 1)[-1] for p in layer_dims}),
            capacity_bytes=int(_env_float("MOS_EXT_VLLM_CAPACITY_MB", 256.0) * (1 << 20)),
            max_tenants=_env_int("MOS_EXT_VLLM_MAX_TENANTS", 256),
            max_tables=_env_int("MOS_EXT_VLLM_MAX_TABLES", _env_int("MOS_EXT_VLLM_MAX_TENANTS", 256)),
            max_rank=_env_int("MOS_EXT_VLLM_MAX_RANK", int(cfg.max_lora_rank)),
            slots=_env_int("MOS_EXT_VLLM_SLOTS", 8), dtype=dtype or cfg.lora_dtype or torch.float32,
            device=manager.device)
        # layer attributes read by the patched _apply_lora_to_output: the store's pools and tables are
        # allocated once and written in place, so each layer's sgmv slices are resolved here, not per call
        st = self.store
        for name, entries in self.layer_slices.items():
            module = manager.modules[name]
            module._mos_runtime = self
            module._mos_slices = [st.sgmv_slice(path, off, size) for path, off, size in entries if path in st.layers]
        self.tp = tp = max((int(getattr(manager.modules[n], "tp_size", 1)) for n in self.layer_slices), default=1)
        rank = max((int(getattr(manager.modules[n], "tp_rank", 0)) for n in self.layer_slices), default=0)
        self.tenants = _Tenants(self.store, cfg.max_loras,
                                lambda: {i for i in manager.lora_index_to_id if i is not None},
                                full_dims=full_dims, ranges=ranges, where=f" (TP rank {rank}/{tp})" if tp > 1 else "")
        self.seg: Optional[Segments] = None  # this step's segments, shared by every layer
        # tables are validated once when written; the hot path runs without per-call value checks
        if os.environ.get("MOS_EXT_CHECK_INDICES") is None:
            set_index_checks(False)

    def load(self, lora_id: int, name: str, path: str, *, replace: bool, agree: bool = True) -> int:
        """A load vLLM asked for. TP 1, or a step's load (``agree=False``): :meth:`_Tenants.load`. An
        ``add_lora`` at TP > 1 (run by every rank: a new id, or an in-place reload): two phases with the
        ranks agreeing between them, so that a load one rank refuses (its share is over the bound, or
        cannot be read) changes no rank, and an in-place reload never leaves ranks serving different
        contents: every rank prepares (nothing changed), the ranks exchange their outcome, all raise the
        first refusal or all commit; a commit that fails on a rank is undone on every rank. A step's
        load re-activates an adapter every rank accepted before (from its host copy), on the ranks whose
        vLLM cache dropped it — not necessarily all — so it is not agreed."""
        t = self.tenants
        if self.tp == 1 or not agree:
            return t.load(lora_id, name, path, replace=replace)
        with t.lock:
            plan, first = self._phase(lambda: t.prepare(lora_id, name, path, replace=replace))
            if first:
                raise MoSAdapterError(f"{first} (refused on another tensor-parallel rank)")
            # every rank takes part in the second exchange, also one with nothing to commit (the adapter is
            # resident here, while another rank's store evicted it and reloads it from its host copy)
            old = t.state(lora_id)
            rank, first = self._phase(lambda: t.store.info(t.key(lora_id))["rank"] if plan is None
                                      else t.commit(lora_id, name, path, plan))
            if first:
                if plan is not None:  # committed here, failed elsewhere: back to what every rank had
                    t.revert(lora_id, *old)
                raise MoSAdapterError(f"{first} (on another tensor-parallel rank; undone here)")
            return rank

    def _phase(self, fn):
        """One phase of an agreed load: ``fn()`` here, then its outcome exchanged with every rank, whatever it
        was (a rank that skipped the exchange would leave the others waiting). Raises this rank's own error;
        else returns ``(fn's result, the first other rank's error or "")``."""
        out, own = None, None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - reported to the other ranks, then raised
            own = e
        first = self._agree(_why(own))
        if own is not None:
            raise own
        return out, first

    def _agree(self, err: str) -> str:
        """Every TP rank's outcome of one phase (an error message or ""); returns the first rank's error, or ""."""
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        out = [None] * self.tp
        dist.all_gather_object(out, err, group=get_tp_group().cpu_group)
        return next((e for e in out if e), "")

    def set_mapping(self, index_mapping) -> None:
        """Build this step's segments from vLLM's per-token adapter ids (0 = base model)."""
        with self.tenants.lock:
            tok = torch.as_tensor(index_mapping, dtype=torch.int64).reshape(-1)  # one pass, not a Python loop
            ids = torch.unique(tok[tok > 0]).tolist()
            slot_of = self.tenants.slots_for_step(ids)  # not ours (vLLM dummy): -1, rows untouched
            if not ids:
                self.seg = None
                return
            lut = torch.full((ids[-1] + 1,), -1, dtype=torch.int64)
            lut[torch.tensor(list(slot_of), dtype=torch.int64)] = torch.tensor(list(slot_of.values()), dtype=torch.int64)
            rows = torch.where(tok > 0, lut[tok.clamp(min=0)], torch.full_like(tok, -1))
            seg = build_segments(rows, device=self.store.device, merge=True)  # one row per token
            self.seg = seg if seg.active else None

    def apply(self, module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        st = self.store
        return add_sgmv(output, x, module._mos_slices, st.scale, self.seg, st.dtype)


_STEP = threading.local()  # .on: inside WorkerLoRAManager.set_active_adapters (a step's adapter loads)


def _why(exc: Optional[BaseException]) -> str:
    """What a rank tells the others of its failed phase ("" when it succeeded)."""
    if exc is None:
        return ""
    return str(exc) if isinstance(exc, MoSAdapterError) else f"{ERROR_PREFIX}: {type(exc).__name__}: {exc}"


def _log():
    import logging

    return logging.getLogger("vllm.mos_ext")  # under vLLM's logger: printed with its own lines


def _runtime(manager) -> _Runtime:
    rt = getattr(manager, "_mos_runtime", None)
    if rt is None:
        rt = _Runtime(manager)
        manager._mos_runtime = rt
    return rt


# ---------------------------------------------------------------------------------------- patches
def _patch_worker():
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    orig_load = WorkerLoRAManager._load_adapter

    def _load_adapter(self, lora_request):
        path = lora_request.lora_path
        if not is_mos_readable(path):
            return orig_load(self, lora_request)
        rt = _runtime(self._adapter_manager)
        rank = rt.load(lora_request.lora_int_id, lora_request.lora_name, path,
                       replace=bool(getattr(lora_request, "load_inplace", False)),
                       agree=not getattr(_STEP, "on", False))
        # a LoRAModel without weights for any module (vLLM wants one entry; its name matches no
        # module): vLLM's slots stay zero, the math runs from the store
        marker = LoRALayerWeights(SHELL_MODULE, rank, rank, torch.zeros(1, 1), torch.zeros(1, 1))
        return LoRAModel(lora_request.lora_int_id, rank, {SHELL_MODULE: marker})

    orig_active = WorkerLoRAManager.set_active_adapters

    def set_active_adapters(self, requests, mapping):
        # a step's loads (vLLM re-activating an adapter its worker cache dropped) are not agreed between TP
        # ranks: that cache's order is not the same on every rank (a set of requests, hashed per process),
        # so one rank may load here while another does not; an exchange would wait forever
        _STEP.on = True
        try:
            return orig_active(self, requests, mapping)
        finally:
            _STEP.on = False

    orig_map = LoRAModelManager.set_adapter_mapping

    def set_adapter_mapping(self, mapping):
        _runtime(self).set_mapping(mapping.index_mapping)
        return orig_map(self, mapping)

    orig_apply = BaseLinearLayerWithLoRA._apply_lora_to_output

    def _apply_lora_to_output(self, x, output):
        rt = getattr(self, "_mos_runtime", None)
        if rt is None:
            return orig_apply(self, x, output)
        return rt.apply(self, x, output)  # add_sgmv takes [..., in] / [..., out] as they come

    orig_async = BaseLinearLayerWithLoRA._apply_async_impl

    def _apply_async_impl(self, x, bias=None):
        # VLLM_LORA_ENABLE_DUAL_STREAM: vLLM's own LoRA on its aux stream (its slots are zero for store
        # tenants), joined into the base output; the store's delta is added after the join
        out = orig_async(self, x, bias)
        rt = getattr(self, "_mos_runtime", None)
        return out if rt is None else rt.apply(self, x, out)

    orig_remove = WorkerLoRAManager.remove_adapter

    def remove_adapter(self, adapter_id):
        # reached by engine_client.remove_lora (the patched /v1/unload_lora_adapter) on every worker;
        # vLLM's in-place reload and its own LRU call the model manager's remove_adapter, not this
        rt = getattr(self._adapter_manager, "_mos_runtime", None)
        if rt is not None:
            rt.tenants.forget(int(adapter_id))
        return orig_remove(self, adapter_id)

    for cls, name, fn in ((WorkerLoRAManager, "_load_adapter", _load_adapter),
                          (WorkerLoRAManager, "set_active_adapters", set_active_adapters),
                          (WorkerLoRAManager, "remove_adapter", remove_adapter),
                          (LoRAModelManager, "set_adapter_mapping", set_adapter_mapping),
                          (BaseLinearLayerWithLoRA, "_apply_lora_to_output", _apply_lora_to_output),
                          (BaseLinearLayerWithLoRA, "_apply_async_impl", _apply_async_impl)):
        fn.__mos_ext_patched__ = True
        setattr(cls, name, fn)


def _patch_api_server():
    try:
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    except ImportError:  # pragma: no cover - not an API-server build
        return
    from http import HTTPStatus

    orig = OpenAIServingModels.load_lora_adapter

    async def load_lora_adapter(self, request, base_model_name=None):
        out = await orig(self, request, base_model_name=base_model_name)
        cached = self.lora_requests.get(getattr(request, "lora_name", None) or "")
        if cached is not None and getattr(cached, "load_inplace", False):
            # vLLM 0.32 caches the request with load_inplace=True (0.34 resets it): every later step
            # would reload the adapter from its directory
            cached.load_inplace = False
        err = getattr(out, "error", None)
        if err is not None and ERROR_PREFIX in str(err.message) and int(err.code) >= 500:
            msg = str(err.message)
            msg = msg[msg.index(ERROR_PREFIX):]
            cut = msg.find("', please check the stack trace")  # vLLM's wrapping of worker errors
            msg = msg[:cut] if cut > 0 else msg
            return create_error_response(message=msg, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST)
        return out

    load_lora_adapter.__mos_ext_patched__ = True
    OpenAIServingModels.load_lora_adapter = load_lora_adapter

    orig_unload = OpenAIServingModels.unload_lora_adapter

    async def unload_lora_adapter(self, request):
        # vLLM 0.32/0.34 only forget the name here; tell every worker, so the store frees the rows now
        req = self.lora_requests.get(getattr(request, "lora_name", None) or "")
        out = await orig_unload(self, request)
        remove = getattr(self.engine_client, "remove_lora", None)
        if req is not None and isinstance(out, str) and remove is not None:
            await remove(req.lora_int_id)
        return out

    unload_lora_adapter.__mos_ext_patched__ = True
    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter


class _Answered:
    """A worker's response queue that records whether the current collective call read it."""

    def __init__(self, mq, read, i):
        self._mq, self._read, self._i = mq, read, i

    def dequeue(self, *args, **kwargs):
        out = self._mq.dequeue(*args, **kwargs)
        self._read[self._i] = True
        return out

    def __getattr__(self, name):
        return getattr(self._mq, name)


def _patch_executor():
    """TP > 1: a blocking collective call that fails on one rank (an adapter mos_ext refuses fails on every
    rank) must not leave the later ranks' answers queued. vLLM 0.32 / 0.34's ``MultiprocExecutor.collective_rpc``
    raises at the first failed answer without reading the rest; the next collective call (the next
    ``add_lora`` / ``remove_lora``) then reads that stale answer: a good load answered with the refusal of an
    earlier bad one, an unload with a 500. This drains the answers left unread before the error goes on."""
    try:
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    except ImportError:  # pragma: no cover - a build without the multiprocess executor
        return
    orig = MultiprocExecutor.collective_rpc

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False, unique_reply_rank=None,
                       kv_output_aggregator=None, ec_output_aggregator=None):
        call = dict(timeout=timeout, args=args, kwargs=kwargs, non_block=non_block,
                    unique_reply_rank=unique_reply_rank, kv_output_aggregator=kv_output_aggregator,
                    ec_output_aggregator=ec_output_aggregator)
        mqs = getattr(self, "response_mqs", None)
        if non_block or unique_reply_rank is not None or not mqs or len(mqs) < 2:
            return orig(self, method, **call)
        read = [False] * len(mqs)
        self.response_mqs = [_Answered(mq, read, i) for i, mq in enumerate(mqs)]
        try:
            return orig(self, method, **call)
        except RuntimeError:
            for i, mq in enumerate(mqs):
                if not read[i]:  # this rank's answer to the failed call: read it now, not in the next call
                    try:
                        mq.dequeue(timeout=300 if timeout is None else timeout)
                    except Exception:  # noqa: BLE001 - the original error is the one to report
                        pass
            raise
        finally:
            self.response_mqs = mqs

    collective_rpc.__mos_ext_patched__ = True
    MultiprocExecutor.collective_rpc = collective_rpc


def register() -> None:
    """The ``vllm.general_plugins`` entry point: idempotent; refuses an untested vLLM."""
    global _patched
    if not enabled():
        return
    with _patch_lock:
        if _patched:
            return
        import vllm

        check_version(getattr(vllm, "__version__", "unknown"))
        from vllm.lora.worker_manager import WorkerLoRAManager

        if getattr(WorkerLoRAManager._load_adapter, "__mos_ext_patched__", False):  # e.g. module reloaded
            _patched = True
            return
        _patch_worker()
        _patch_api_server()
        _patch_executor()
        _patched = True
