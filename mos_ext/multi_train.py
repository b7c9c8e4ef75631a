"""Many tenants' adapters trained in one batch over one frozen base (issue 22).

A MoS ``PeftModel`` holding several adapters (MoS of any ``r``/``e``/``l``/``p``, LoRA and MiSS in
shard form, any mix) trains them together: every batch row belongs to one adapter (a *tenant*) or
to none, the base runs once for all rows, and every adapted layer adds all tenants' deltas with
**one** :func:`mos_ext.ops.sharded_lora` call whose backward gives each tenant's pool gradient
through the fused ``shard_grad`` grouped by ``seg_tenant``.

The stacked operand (per projection type and side, built once per forward, shared by every layer
of that type):

* shard length: the gcd ``g`` of the tenants' shard lengths. A contiguous pool ``[P, s]`` is *viewed*
  as ``[P*k, g]`` (``k = s/g``, no copy) and each table entry ``p`` becomes ``p*k .. p*k+k-1``;
* pools: the views are concatenated, ``[Σ P_t k_t, g]`` (one copy of every tenant's pool of that
  type per forward: pools are compressed, so this is small against the activations), behind one
  :func:`mos_ext.ops.pool_grad_tap` so all layers' ``shard_grad`` accumulate into one buffer, which
  the concatenation's backward splits into each tenant's pool gradient (views);
* tables: ``[T, r_max, l*k]`` int32 per layer, entries offset by the tenant's first row in the
  stack, ranks padded to ``r_max`` with ``-1`` rows; built once per tenant set (cached) and reused;
* ``scale``: fp32 ``[T]``.

:class:`JointTraining` is the plain-PyTorch face (tenants join and leave between steps, each with its
own optimizer, schedule, clipping, dropout seed, loss normalisation and checkpoint);
:class:`JointModel` is the ``nn.Module`` a ``Trainer`` or DDP wraps (``forward(..., adapter_names=)``).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file
from torch import nn

from . import ops
from .adapter_io import split_table
from .batch import BatchMetadata, Segments
from .layers import MoSLinear
from .settings import deterministic_grads

__all__ = ["TenantSettings", "JointTraining", "JointModel", "JointOutput", "UnknownAdapterError",
           "FrozenAdapterError", "TenantMismatchError", "token_losses", "TENANT_STATE"]

# the file a tenant's checkpoint keeps its optimizer / schedule / counters in, beside PEFT's files
TENANT_STATE = "tenant_state.pt"
IGNORE_INDEX = -100


class UnknownAdapterError(KeyError):
    """A batch row names an adapter the model does not hold."""

    def __str__(self):  # KeyError quotes its message
        return str(self.args[0]) if self.args else ""


class FrozenAdapterError(ValueError):
    """A batch row (or a tenant being added) names an adapter that is not trained jointly (inference
    mode, or held by the model but not added as a tenant)."""


class TenantMismatchError(ValueError):
    """An adapter cannot train in one batch with the others (other targets / layers, other pool dtype)."""


@dataclass
class TenantSettings:
    """One tenant's training settings, as if it trained alone.

    ``lr``, ``betas``, ``eps``, ``weight_decay``: its AdamW. ``schedule``: a function of the tenant's own
    step count giving the lr multiplier (``LambdaLR``), ``None`` for constant. ``max_grad_norm``: clips
    the norm of the tenant's own pool gradients (``None``: no clipping). ``seed``: its dropout
    generator. ``optimizer``: a factory ``params -> torch.optim.Optimizer`` replacing AdamW.
    """
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Optional[Callable[[int], float]] = None
    max_grad_norm: Optional[float] = None
    seed: int = 0
    optimizer: Optional[Callable[[List[nn.Parameter]], torch.optim.Optimizer]] = None


@dataclass
class _Tenant:
    name: str
    settings: TenantSettings
    params: List[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    generator: torch.Generator
    dropout: float
    steps: int = 0
    nonfinite_steps: int = 0
    history: List[float] = field(default_factory=list)


class JointOutput(dict):
    """``loss`` (the sum of the tenants' own mean losses: its gradient is each tenant's own gradient),
    ``logits``, ``tenant_losses`` {name: mean over its tokens, detached}, ``tenant_tokens`` {name: count}
    and ``skipped`` (tenants whose loss was non-finite, left out of ``loss``)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of next-token cross entropy and per-row count of its target tokens (labels ``-100``
    ignored), the causal-LM shift applied; fp16/bf16 logits are upcast to fp32, fp64 stays fp64."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    lg = logits[:, :-1, :]
    tg = labels[:, 1:].to(lg.device)
    ce = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=IGNORE_INDEX,
                                     reduction="none").view(tg.shape)
    return ce.sum(1), (tg != IGNORE_INDEX).sum(1)


class _Stack:
    """The tenants' pools of one projection type as one operand, per forward."""

    def __init__(self, g_a: int, g_b: int, k_a, k_b, off_a, off_b):
        self.g_a, self.g_b, self.k_a, self.k_b, self.off_a, self.off_b = g_a, g_b, k_a, k_b, off_a, off_b


def _expand_table(idx: torch.Tensor, k: int, off: int, r_max: int) -> torch.Tensor:
    """[r, l] table of a pool of shard length s -> [r_max, l*k] table of the stacked pool of shard length
    s/k: entry p -> off + p*k + j (j < k), -1 stays -1, rank rows padded with -1."""
    e = split_table(idx.to(torch.int64), k)
    e = torch.where(e >= 0, e + off, torch.full_like(e, -1))
    r, lk = e.shape
    if r < r_max:
        e = torch.cat([e, torch.full((r_max - r, lk), -1, dtype=torch.int64)])
    return e.to(torch.int32)


class _Forward:
    """One joint forward pass: its rows' tenants, their segments, and the stacked pools built for it."""

    def __init__(self, joint: "JointTraining", slots: List[int]):
        self.joint = joint
        self.slots = slots
        self.meta = BatchMetadata(slots, merge=False)  # one segment per row: no row depends on its mates
        self.names = tuple(joint.tenants)  # fixed for the pass: tenants join and leave between steps
        self.drops = [(i, t) for i, t in enumerate(joint.tenants.values()) if t.dropout > 0]
        self.pools: Dict[tuple, tuple] = {}
        self.token_idx: Dict[tuple, Dict[int, torch.Tensor]] = {}
        self.checked = set()


class JointTraining:
    """Train several adapters of one MoS ``PeftModel`` in one batch (see the module docstring).

    ``joint = JointTraining(peft_model)``; ``joint.add_tenant(name, TenantSettings(...))`` for each
    adapter to train (the adapter must exist in the model and not be in inference mode);
    ``joint.train_step(input_ids, attention_mask, labels, adapter_names=[...])`` runs one step (one name
    per row, ``None`` for a row that uses no adapter). ``remove_tenant`` / ``add_tenant`` between steps
    let tenants leave and join without touching the others' optimizer state. ``save_tenant`` /
    ``load_tenant`` keep a tenant's adapter (format 2, PEFT's ``save_pretrained``) and its optimizer.

    While attached, the model's MoS layers route every row to its tenant: call the model inside
    :meth:`batch` (or through :class:`JointModel`); a call outside it raises.
    """

    def __init__(self, peft_model: nn.Module):
        self.model = peft_model
        self.tuner = peft_model.base_model
        if not hasattr(self.tuner, "pool_bank") or self.tuner.pool_bank() is None:
            raise TypeError("JointTraining needs a PeftModel whose adapters are MoS adapters (mos_ext.MoSConfig)")
        self.bank = self.tuner.pool_bank()
        self.tenants: "Dict[str, _Tenant]" = {}
        self._fwd: Optional[_Forward] = None
        # per tenant set, emptied whenever a tenant joins or leaves (_forget_stacks)
        self._tables: Dict[tuple, tuple] = {}  # (layer id, tenant names) -> (idx_a, idx_b)
        self._layout: Dict[tuple, _Stack] = {}  # (type, tenant names) -> stacking layout
        self._scale: Dict[tuple, torch.Tensor] = {}
        self.last_tokens: Dict[str, int] = {}
        self.last_skipped: List[str] = []
        self._attach()

    def _attach(self) -> None:
        """Route every MoS layer of the model through this object (the hook MoSLinear calls)."""
        self.layers: List[MoSLinear] = [m for _, m in self.tuner.mos_layers()]
        for m in self.layers:
            m._mos_joint = self

    # ------------------------------------------------------------------ tenants
    @property
    def names(self) -> List[str]:
        return list(self.tenants)

    def _targets(self, name: str):
        cfg = self.tuner.peft_config[name]
        return {t: list(v) for t, v in (cfg.type_layers or {}).items()}

    def add_tenant(self, name: str, settings: Optional[TenantSettings] = None) -> None:
        """Start training adapter ``name`` (it joins from the next step on)."""
        settings = settings or TenantSettings()
        if name in self.tenants:
            raise ValueError(f"{name!r} is already a tenant")
        if name not in self.tuner.peft_config:
            raise UnknownAdapterError(f"adapter {name!r} does not exist (adapters: {list(self.tuner.peft_config)})")
        cfg = self.tuner.peft_config[name]
        if cfg.inference_mode:
            raise FrozenAdapterError(f"adapter {name!r} is in inference mode (frozen): it cannot train; load it with "
                                     f"is_trainable=True")
        if self.tenants:
            first = next(iter(self.tenants))
            if self._targets(name) != self._targets(first):
                raise TenantMismatchError(f"adapter {name!r} targets other layers than {first!r} "
                                          f"({sorted(self._targets(name))} vs {sorted(self._targets(first))}): "
                                          f"tenants trained in one batch must adapt the same layers")
            dt = {p.dtype for t in self._targets(name) for p in self.bank.get(name, t)}
            dt0 = {p.dtype for t in self._targets(first) for p in self.bank.get(first, t)}
            if dt != dt0:
                raise TenantMismatchError(f"adapter {name!r}'s pools are {sorted(map(str, dt))}, {first!r}'s are "
                                          f"{sorted(map(str, dt0))}: one pool dtype per joint batch")
        self._set_trainable(list(self.tenants) + [name])
        params = [p for _, p in self.bank.items(name) if isinstance(p, nn.Parameter) and p.requires_grad]
        s = settings
        opt = (s.optimizer(params) if s.optimizer is not None else
               torch.optim.AdamW(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, s.schedule) if s.schedule is not None else None
        drop = float(cfg.lora_dropout)
        self.tenants[name] = _Tenant(name, s, params, opt, sched, torch.Generator().manual_seed(int(s.seed)), drop)
        self._forget_stacks()

    def remove_tenant(self, name: str, delete_adapter: bool = False) -> None:
        """Stop training ``name`` (its pools freeze; the others' optimizers are untouched). With
        ``delete_adapter`` its adapter leaves the model too."""
        if name not in self.tenants:
            raise UnknownAdapterError(f"{name!r} is not a tenant (tenants: {self.names})")
        del self.tenants[name]
        self._forget_stacks()
        if delete_adapter:
            self.tuner.delete_adapter(name)
        self._set_trainable(self.names)

    def _forget_stacks(self) -> None:
        """The cached tables, layouts and scales belong to the old tenant set: drop them all (a cache
        kept per past tenant set would hold every layer's tables on the device after each join)."""
        self._tables.clear()
        self._layout.clear()
        self._scale.clear()

    def _set_trainable(self, names: List[str]) -> None:
        if names:
            self.tuner.set_adapter(names)  # requires_grad on these adapters' pools only
        for p in self.model.parameters():
            if p.requires_grad and not any(p is q for n in names for _, q in self.bank.items(n)):
                p.requires_grad_(False)

    def detach(self) -> None:
        """Give the model back its ordinary (one-adapter) forward."""
        for m in self.layers:
            m._mos_joint = None

    # ------------------------------------------------------------------ forward
    def slots(self, adapter_names: Sequence[Optional[str]]) -> List[int]:
        """Tenant index per row (``-1`` for ``None``); unknown or frozen adapters are named errors."""
        idx = {n: i for i, n in enumerate(self.tenants)}
        out = []
        for i, n in enumerate(adapter_names):
            if n is None:
                out.append(-1)
            elif n in idx:
                out.append(idx[n])
            elif n in self.tuner.peft_config:
                raise FrozenAdapterError(f"row {i} names adapter {n!r}, which is not trained in this job (frozen or "
                                         f"not added with add_tenant; tenants: {self.names})")
            else:
                raise UnknownAdapterError(f"row {i} names adapter {n!r}, which the model does not hold "
                                          f"(tenants: {self.names})")
        return out

    @contextlib.contextmanager
    def batch(self, adapter_names: Sequence[Optional[str]]):
        """Inside, the model's forward routes row ``i`` to adapter ``adapter_names[i]``."""
        prev = self._fwd
        self._fwd = _Forward(self, self.slots(adapter_names))
        try:
            yield self._fwd
        finally:
            self._fwd = prev

    def _stack_layout(self, ptype: str, names: tuple) -> _Stack:
        key = (ptype, names)
        lay = self._layout.get(key)
        if lay is None:
            pools = [self.bank.get(n, ptype) for n in names]
            g_a = math.gcd(*[int(a.shape[1]) for a, _ in pools])
            g_b = math.gcd(*[int(b.shape[1]) for _, b in pools])
            k_a = [int(a.shape[1]) // g_a for a, _ in pools]
            k_b = [int(b.shape[1]) // g_b for _, b in pools]
            off_a, off_b, oa, ob = [], [], 0, 0
            for (a, b), ka, kb in zip(pools, k_a, k_b):
                off_a.append(oa)
                off_b.append(ob)
                oa += int(a.shape[0]) * ka
                ob += int(b.shape[0]) * kb
            lay = _Stack(g_a, g_b, k_a, k_b, off_a, off_b)
            self._layout[key] = lay
        return lay

    def _stacked_pools(self, fwd: _Forward, ptype: str, names: tuple):
        hit = fwd.pools.get(ptype)
        if hit is None:
            lay = self._stack_layout(ptype, names)
            pools = [self.bank.get(n, ptype) for n in names]
            if len(pools) == 1 and lay.k_a[0] == 1 and lay.k_b[0] == 1:
                sa, sb = pools[0]
            else:  # views [P*k, g] (no copy), concatenated once per forward per type
                sa = torch.cat([a.reshape(-1, lay.g_a) for a, _ in pools])
                sb = torch.cat([b.reshape(-1, lay.g_b) for _, b in pools])
            # one gradient buffer per stacked pool for every layer of this type
            hit = (ops.pool_grad_tap(sa), ops.pool_grad_tap(sb))
            fwd.pools[ptype] = hit
        return hit

    def _layer_tables(self, layer: MoSLinear, ptype: str, names: tuple, device):
        key = (id(layer), names)
        hit = self._tables.get(key)
        if hit is None:
            lay = self._stack_layout(ptype, names)
            r_max = max(int(layer.mos_idx_a[n].shape[1]) for n in names)
            ia = torch.stack([_expand_table(layer.mos_idx_a[n][0].cpu(), k, o, r_max)
                              for n, k, o in zip(names, lay.k_a, lay.off_a)])
            ib = torch.stack([_expand_table(layer.mos_idx_b[n][0].cpu(), k, o, r_max)
                              for n, k, o in zip(names, lay.k_b, lay.off_b)])
            hit = (ia.to(device).contiguous(), ib.to(device).contiguous())
            self._tables[key] = hit
        return hit

    def _scales(self, layer: MoSLinear, names: tuple, device) -> torch.Tensor:
        key = (names, device)
        t = self._scale.get(key)
        if t is None:
            t = torch.tensor([float(layer.mos_scale[n]) for n in names], dtype=torch.float32, device=device)
            self._scale[key] = t
        return t

    def _dropout(self, fwd: _Forward, xs: torch.Tensor, rows: int, per: int, training: bool) -> torch.Tensor:
        """Each tenant's dropout on its own tokens, drawn from its own generator (layer by layer, in
        forward order, as when it trains alone)."""
        drops = fwd.drops
        if not drops or not training:
            return xs
        key = (rows, per)
        tok = fwd.token_idx.get(key)
        if tok is None:
            tok_t = fwd.meta.token_tenants(rows, per)
            tok = {i: torch.nonzero(tok_t == i).reshape(-1).to(xs.device) for i, _ in drops}
            fwd.token_idx[key] = tok
        out = xs
        for i, t in drops:
            ix = tok[i]
            if ix.numel() == 0:
                continue
            keep = 1.0 - t.dropout
            m = torch.empty((ix.numel(), xs.shape[1]), dtype=xs.dtype).bernoulli_(keep, generator=t.generator)
            out = out.index_copy(0, ix, xs.index_select(0, ix) * (m.to(xs.device) / keep))  # out of place
        return out

    def layer_delta(self, layer: MoSLinear, x: torch.Tensor, act: torch.dtype) -> torch.Tensor:
        """The hook :class:`~mos_ext.layers.MoSLinear` calls while attached: every row's own adapter's
        delta, ``[..., out]`` in ``act``."""
        fwd = self._fwd
        if fwd is None:
            raise RuntimeError("this model trains several adapters jointly (mos_ext.JointTraining is attached): "
                               "call it inside joint.batch(adapter_names) or through JointModel(..., adapter_names=) "
                               "(gradient checkpointing's recomputation is not supported), or joint.detach() first")
        names = fwd.names
        if not names:
            raise RuntimeError("JointTraining has no tenants: add_tenant first")
        ptype = layer._mos_pools[names[0]][1]
        if x.dim() >= 3:
            rows, per = int(x.shape[0]), int(math.prod(x.shape[1:-1]))
        else:
            rows, per = int(x.reshape(-1, x.shape[-1]).shape[0]), 1
        xs = x.reshape(-1, layer.in_features)
        seg: Segments = fwd.meta.segments(rows, per, xs.device)
        if (rows, per, xs.device) not in fwd.checked:
            ops.validate_segments(*seg.args(), xs.shape[0], len(names))
            fwd.checked.add((rows, per, xs.device))
        if not seg.active:
            return torch.zeros((*x.shape[:-1], layer.out_features), dtype=act, device=x.device)
        sa, sb = self._stacked_pools(fwd, ptype, names)
        ia, ib = self._layer_tables(layer, ptype, names, xs.device)
        if sa.dtype not in (act, torch.float32):  # fp16 pools under bf16 activations: the pools' dtype
            xs = xs.to(sa.dtype)
        if xs.shape[-1] > 1 and xs.stride(-1) != 1:
            xs = xs.contiguous()
        xs = self._dropout(fwd, xs, rows, per, layer.training)
        det = any(layer.mos_deterministic.get(n, False) for n in names)
        with deterministic_grads(True) if det else contextlib.nullcontext():
            d = ops.sharded_lora(xs, sa, sb, ia, ib, self._scales(layer, names, xs.device), *seg.args())
        return d.reshape(*x.shape[:-1], layer.out_features).to(act)

    # ------------------------------------------------------------------ loss and step
    def forward(self, input_ids=None, attention_mask=None, labels=None, adapter_names=None, **kwargs) -> JointOutput:
        """The model on a mixed batch; with ``labels``, each tenant's loss is the mean over its own target
        tokens (never over its mates'), and ``loss`` their sum. Under ``torch.distributed`` the token counts
        (and non-finite flags) are summed over ranks first, so that DDP's gradient mean gives each tenant
        the gradient of its mean over the global batch."""
        if adapter_names is None:
            raise ValueError("a joint batch needs adapter_names (one adapter name or None per row)")
        names = list(adapter_names)
        batch = (input_ids if input_ids is not None else kwargs.get("inputs_embeds")).shape[0]
        if len(names) != batch:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch} rows")
        with self.batch(names) as fwd:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        res = JointOutput(logits=out.logits)
        if labels is None:
            return res
        row_sum, row_cnt = token_losses(out.logits, labels)
        T = len(self.tenants)
        slot = torch.tensor(fwd.slots, dtype=torch.int64, device=row_sum.device)
        mask = (slot.unsqueeze(0) == torch.arange(T, device=row_sum.device).unsqueeze(1))  # [T, B]
        sums = torch.where(mask, row_sum.unsqueeze(0), 0).sum(1)
        cnt = (mask * row_cnt.unsqueeze(0)).sum(1).to(torch.float64)
        bad = (~torch.isfinite(sums.detach())).to(torch.float64)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                both = torch.cat([cnt, bad])
                torch.distributed.all_reduce(both)
                cnt, bad = both[:T], both[T:]
        # every tenant's mean (a tenant without tokens divides by 1 and is left out below), read back
        # with the counts and flags in one transfer rather than one per tenant
        means = sums / cnt.clamp(min=1).to(sums.dtype) * world
        host = torch.cat([cnt, bad, means.detach().to(torch.float64)]).tolist()
        cnt_l, bad_l, mean_l = host[:T], host[T:2 * T], host[2 * T:]
        losses, tokens, skipped, total = {}, {}, [], None
        for i, n in enumerate(self.tenants):
            if cnt_l[i] == 0:
                continue
            tokens[n] = int(cnt_l[i])
            if bad_l[i] > 0:
                skipped.append(n)
                losses[n] = float("nan")
                continue
            losses[n] = mean_l[i]
            total = means[i] if total is None else total + means[i]
        if total is None:  # no tenant with a finite loss: a zero that still reaches every pool (DDP)
            total = out.logits.sum() * 0
        self.last_tokens, self.last_skipped = tokens, skipped
        res.update(loss=total, tenant_losses=losses, tenant_tokens=tokens, skipped=skipped)
        return res

    def optimizer_step(self) -> Dict[str, str]:
        """Per tenant that had tokens in the last forward: clip its own gradients, step its optimizer and
        schedule. A tenant whose loss or gradient norm is not finite is skipped (pools and optimizer
        state unchanged, ``nonfinite_steps`` counted). Zeroes every tenant's gradients. Returns
        {tenant: "stepped" | "skipped (non-finite)"}."""
        done = {}
        present = [(n, t) for n, t in self.tenants.items() if n in self.last_tokens]
        norms = {}
        for n, t in present:
            if n in self.last_skipped:
                continue
            if t.settings.max_grad_norm is not None:
                norms[n] = torch.nn.utils.clip_grad_norm_(t.params, t.settings.max_grad_norm)
            else:
                grads = [p.grad for p in t.params if p.grad is not None]
                norms[n] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
                    if grads else torch.zeros(())
        # one read-back for every tenant's finiteness, not one per tenant
        finite = {}
        if norms:
            dev = next(iter(norms.values())).device
            flags = torch.stack([v.to(dev, torch.float64) for v in norms.values()]).isfinite().tolist()
            finite = dict(zip(norms, flags))
        for n, t in present:
            ok = finite.get(n, False)
            if ok:
                t.optimizer.step()
                if t.scheduler is not None:
                    t.scheduler.step()
                t.steps += 1
                done[n] = "stepped"
            else:
                t.nonfinite_steps += 1
                done[n] = "skipped (non-finite)"
        self.zero_grad()
        return done

    def zero_grad(self) -> None:
        for t in self.tenants.values():
            t.optimizer.zero_grad(set_to_none=True)

    def train_step(self, input_ids, attention_mask=None, labels=None, adapter_names=None, **kwargs) -> Dict[str, float]:
        """One joint step: forward, each tenant's mean loss, one backward, per-tenant clip and step.
        Returns {tenant: its loss} for the tenants that had tokens (NaN for a skipped one)."""
        self.model.train()
        self.zero_grad()
        out = self.forward(input_ids=input_ids, attention_mask=attention_mask,
                           labels=input_ids if labels is None else labels, adapter_names=adapter_names, **kwargs)
        out.loss.backward()
        self.optimizer_step()
        for n, v in out.tenant_losses.items():
            self.tenants[n].history.append(v)
        return dict(out.tenant_losses)

    # ------------------------------------------------------------------ checkpoints
    def tenant_state(self, name: str) -> dict:
        t = self.tenants[name]
        return {"optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
                "generator": t.generator.get_state(), "steps": t.steps, "nonfinite_steps": t.nonfinite_steps}

    def load_tenant_state(self, name: str, state: dict) -> None:
        t = self.tenants[name]
        t.optimizer.load_state_dict(state["optimizer"])
        if t.scheduler is not None and state.get("scheduler") is not None:
            t.scheduler.load_state_dict(state["scheduler"])
        t.generator.set_state(state["generator"])
        t.steps, t.nonfinite_steps = int(state["steps"]), int(state["nonfinite_steps"])

    def save_tenant(self, name: str, directory: str) -> str:
        """Save one tenant into its own format-2 adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``, readable by ``PeftModel.from_pretrained``, ``AdapterStore.load`` and
        the vLLM plugin) plus ``tenant_state.pt`` (its optimizer, schedule, dropout generator, step
        counts). Returns the directory."""
        if name not in self.tenants:
            raise UnknownAdapterError(f"{name!r} is not a tenant (tenants: {self.names})")
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory, selected_adapters=[name])
        # PEFT writes a non-default adapter into <dir>/<name>/: move its files up so the directory is the adapter
        sub = os.path.join(directory, name)
        if name != "default" and os.path.isdir(sub):
            for f in os.listdir(sub):
                os.replace(os.path.join(sub, f), os.path.join(directory, f))
            os.rmdir(sub)
        torch.save(self.tenant_state(name), os.path.join(directory, TENANT_STATE))
        return directory

    def restore_tenant(self, name: str, directory: str) -> None:
        """Put a tenant back to what :meth:`save_tenant` wrote into ``directory``: its pools (in place, so
        optimizers keep their parameters) and, when present, its optimizer, schedule, dropout generator and
        step counts. Every pool must be in the file with its shape (else ``ValueError``, nothing changed)."""
        if name not in self.tenants:
            raise UnknownAdapterError(f"{name!r} is not a tenant (tenants: {self.names})")
        sd = load_file(os.path.join(directory, "adapter_model.safetensors"))
        pools = dict(self.tuner.pools(name))
        saved = {k.rsplit(".", 1)[-1]: v for k, v in sd.items() if ".shard_pools." in k or k.startswith("shard_pools.")}
        missing = sorted(set(pools) - set(saved))
        bad = sorted(k for k in pools if k in saved and tuple(saved[k].shape) != tuple(pools[k].shape))
        if missing or bad:
            raise ValueError(f"{directory}: not a checkpoint of tenant {name!r}: pools missing {missing[:4]}, "
                             f"of another shape {bad[:4]}")
        with torch.no_grad():
            for k, p in pools.items():
                p.copy_(saved[k])
        path = os.path.join(directory, TENANT_STATE)
        if os.path.exists(path):
            self.load_tenant_state(name, torch.load(path, weights_only=False))

    def load_tenant(self, name: str, directory: str, settings: Optional[TenantSettings] = None) -> None:
        """Resume a tenant saved by :meth:`save_tenant` (adapter and optimizer state); it joins the next step.
        A directory without ``tenant_state.pt`` (a plain adapter) starts a fresh optimizer."""
        if name in self.tuner.peft_config:
            raise ValueError(f"adapter {name!r} is already in the model")
        self.model.load_adapter(directory, adapter_name=name, is_trainable=True)
        self._attach()  # the new adapter's layers may be new modules
        self.add_tenant(name, settings)
        path = os.path.join(directory, TENANT_STATE)
        if os.path.exists(path):
            self.load_tenant_state(name, torch.load(path, weights_only=False))


class JointModel(nn.Module):
    """The module a ``Trainer`` or ``DistributedDataParallel`` wraps: ``forward(input_ids, attention_mask,
    labels, adapter_names=[...])`` returns a :class:`JointOutput` (see :meth:`JointTraining.forward`)."""

    def __init__(self, joint: JointTraining):
        super().__init__()
        self.peft_model = joint.model
        object.__setattr__(self, "joint", joint)

    def forward(self, input_ids=None, attention_mask=None, labels=None, adapter_names=None, **kwargs):
        return self.joint.forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                  adapter_names=adapter_names, **kwargs)
