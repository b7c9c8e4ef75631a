"""Many tenants trained in one batch under ``transformers.Trainer`` (issue 22).

* :class:`TenantMix`: the tenants' datasets as one dataset of *steps*: step ``k`` holds
  ``rows_per_step`` rows of every tenant that is still training (a tenant runs its own ``epochs``
  over its own dataset, then leaves; a tenant with ``start_step`` joins later), each row tagged with
  its adapter name. A tenant's rows come in its dataset's order, so its run is the one it would
  have alone with batch size ``rows_per_step``.
* :class:`TenantCollator`: pads a step's rows (right side; labels ``-100``) and passes
  ``adapter_names`` (one per row) to the model.
* :class:`JointTrainer`: a ``Trainer`` over a MoS ``PeftModel`` and ``tenants={name: TenantSettings}``:
  it trains them with :class:`mos_ext.multi_train.JointTraining` (each tenant's own mean loss, AdamW,
  schedule, clipping, dropout seed), reads the steps in order, and saves every tenant into
  ``<checkpoint>/tenants/<name>`` (a format-2 adapter directory plus its optimizer state).

Use ``per_device_train_batch_size=1`` (one item is one step), ``max_grad_norm=0`` (clipping is per
tenant: ``TenantSettings.max_grad_norm``) and ``gradient_accumulation_steps=1``.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence

import torch
from transformers import Trainer

from ..multi_train import IGNORE_INDEX, JointModel, JointTraining, TenantSettings

__all__ = ["TenantMix", "TenantCollator", "JointTrainer"]


class TenantMix(torch.utils.data.Dataset):
    """``datasets``: {adapter name: dataset of dicts with ``input_ids`` (and optionally ``labels``)}.
    ``rows_per_step``: rows per tenant per step (an int, or a dict per tenant). ``epochs``: passes over
    each tenant's dataset (int or dict). ``start_step``: {name: step it joins at} (default 0).
    Item ``k`` is the list of step ``k``'s rows, each with ``adapter_name``."""

    def __init__(self, datasets: Mapping[str, Sequence], rows_per_step=2, epochs=1,
                 start_step: Optional[Mapping[str, int]] = None):
        self.datasets = dict(datasets)
        per = lambda v, n: int(v[n] if isinstance(v, Mapping) else v)  # noqa: E731
        self.plan = {}
        for n, ds in self.datasets.items():
            b, ep, s0 = per(rows_per_step, n), per(epochs, n), int((start_step or {}).get(n, 0))
            if b < 1 or len(ds) < 1:
                raise ValueError(f"tenant {n!r}: rows_per_step and its dataset must not be empty")
            steps = -(-(len(ds) * ep) // b)  # its last step may be short
            self.plan[n] = (b, s0, steps, len(ds) * ep)
        self.num_steps = max(s0 + steps for _, s0, steps, _ in self.plan.values())

    def __len__(self):
        return self.num_steps

    def __getitem__(self, k: int):
        out = []
        for n, (b, s0, steps, total) in self.plan.items():
            j = k - s0
            if not 0 <= j < steps:
                continue
            ds = self.datasets[n]
            for i in range(j * b, min((j + 1) * b, total)):
                row = dict(ds[i % len(ds)])
                row["adapter_name"] = n
                out.append(row)
        return out


class TenantCollator:
    """Pads a step's rows to one length (right side): ``input_ids`` with ``pad_token_id``,
    ``attention_mask``, ``labels`` (``input_ids`` where a row has none) with ``-100``; ``adapter_names``
    one per row. Takes a batch of one :class:`TenantMix` item (or plain rows)."""

    def __init__(self, pad_token_id: int = 0):
        self.pad = int(pad_token_id)

    def __call__(self, features):
        if len(features) == 1 and isinstance(features[0], list):
            features = features[0]
        if not features:
            raise ValueError("an empty step: no tenant has rows left (TenantMix ended?)")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long) for f in features]
        L = max(int(t.numel()) for t in ids)
        B = len(ids)
        out_ids = torch.full((B, L), self.pad, dtype=torch.long)
        out_lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, (a, b) in enumerate(zip(ids, labels)):
            out_ids[i, :a.numel()] = a
            out_lab[i, :b.numel()] = b
            mask[i, :a.numel()] = 1
        return {"input_ids": out_ids, "attention_mask": mask, "labels": out_lab,
                "adapter_names": [f.get("adapter_name") for f in features]}


class _TenantOptimizers(torch.optim.Optimizer):
    """The tenants' own optimizers behind the one optimizer a Trainer steps: ``step`` is
    :meth:`JointTraining.optimizer_step` (per tenant: present this step, clip, step, schedule)."""

    def __init__(self, joint: JointTraining):  # noqa: D107 - no torch.optim.Optimizer.__init__: no own params
        self.joint = joint
        self.defaults = {}
        self.state = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def param_groups(self):
        return [g for t in self.joint.tenants.values() for g in t.optimizer.param_groups]

    def step(self, closure=None):
        if closure is not None:
            closure()
        self.joint.optimizer_step()

    def zero_grad(self, set_to_none: bool = True):
        self.joint.zero_grad()

    def state_dict(self):
        return {"tenants": {n: self.joint.tenant_state(n) for n in self.joint.tenants}}

    def load_state_dict(self, state_dict):
        for n, st in state_dict["tenants"].items():
            if n in self.joint.tenants:
                self.joint.load_tenant_state(n, st)


class _TenantSchedules:
    """Trainer's scheduler slot: the schedules are per tenant (stepped with its optimizer); this reports
    the first tenant's lr for logging."""

    def __init__(self, joint: JointTraining):
        self.joint = joint

    def step(self):
        return None

    def get_last_lr(self):
        return [g["lr"] for t in self.joint.tenants.values() for g in t.optimizer.param_groups][:1] or [0.0]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        return None


class JointTrainer(Trainer):
    """``JointTrainer(model=peft_model, tenants={name: TenantSettings(...)}, args=..., train_dataset=TenantMix(...))``.

    The model's adapters named in ``tenants`` train together (see the module docstring). ``self.joint``
    is the :class:`~mos_ext.multi_train.JointTraining` (tenants can be added or removed between
    ``train()`` calls)."""

    def __init__(self, model=None, tenants: Optional[Dict[str, TenantSettings]] = None, args=None,
                 data_collator=None, **kwargs):
        if not tenants:
            raise ValueError("JointTrainer needs tenants={adapter name: TenantSettings}")
        if args is not None and args.max_grad_norm:
            raise ValueError(f"TrainingArguments.max_grad_norm={args.max_grad_norm} would clip all tenants together: "
                             f"set it to 0 and give each tenant TenantSettings(max_grad_norm=...)")
        if args is not None and args.gradient_accumulation_steps != 1:
            raise ValueError("gradient_accumulation_steps must be 1 (a tenant's loss is the mean over its own "
                             "tokens of one step; use a larger rows_per_step)")
        self.joint = JointTraining(model)
        for n, s in tenants.items():
            self.joint.add_tenant(n, s)
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        super().__init__(model=JointModel(self.joint), args=args,
                         data_collator=data_collator or TenantCollator(pad if pad is not None else 0), **kwargs)
        self.model_accepts_loss_kwargs = False

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return torch.utils.data.SequentialSampler(ds)  # a tenant's rows in its own order

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = _TenantOptimizers(self.joint)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = _TenantSchedules(self.joint)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        if out.get("tenant_losses"):
            self.joint.last_losses = dict(out["tenant_losses"])
        return (out["loss"], out) if return_outputs else out["loss"]

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        for n in self.joint.tenants:
            self.joint.save_tenant(n, os.path.join(output_dir, "tenants", n))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume: each tenant back from ``<checkpoint>/tenants/<name>`` (:meth:`JointTraining.restore_tenant`:
        pools in place, optimizer, schedule, dropout generator, step counts)."""
        for n in self.joint.tenants:
            self.joint.restore_tenant(n, os.path.join(resume_from_checkpoint, "tenants", n))
