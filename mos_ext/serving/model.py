"""MultiTenantModel: one base model, many tenants per batch, one ``sgmv`` per adapted layer."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..batch import BatchMetadata, add_sgmv
from ..bases import base_dims
from .store import AdapterStore


class MultiTenantLinear(nn.Module):
    """A base linear layer plus the store's adapters for this layer path."""

    def __init__(self, base: nn.Module, store: AdapterStore, path: str, owner: "MultiTenantModel"):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, _ = base_dims(base)
        self._store = store
        self._path = path
        self._key = store.layers[path]
        object.__setattr__(self, "_owner", owner)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        ctx = self._owner._ctx
        if ctx is None:
            return out
        if x.dim() == 3:
            n_seq, seq_len = x.shape[0], x.shape[1]
        elif x.dim() == 2:
            n_seq, seq_len = x.shape[0], 1
        else:
            raise ValueError(f"{self._path}: expected [batch, seq, features] input, got {tuple(x.shape)}")
        st = self._store
        return add_sgmv(out, x, [st.sgmv_slice(self._path)], st.scale, ctx.segments(n_seq, seq_len, x.device),
                        st.dtype)


class MultiTenantModel(nn.Module):
    """Serve many tenants' adapters from one ``AdapterStore`` in mixed batches.

    ``forward(..., adapter_names=[...])`` / ``generate(..., adapter_names=[...])``: one name per
    sequence, ``None`` for the base model (PEFT's convention). Every adapted layer adds all
    tenants' deltas with one ``sgmv`` call.
    """

    def __init__(self, model: nn.Module, store: AdapterStore):
        super().__init__()
        self.store = store
        self._ctx: Optional[BatchMetadata] = None
        for path in store.layers:
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, MultiTenantLinear(getattr(parent, leaf), store, path, self))
        self.base_model = model
        for p in model.parameters():
            p.requires_grad_(False)

    def _context(self, adapter_names: Optional[Sequence[Optional[str]]], batch: int):
        if adapter_names is None:
            return None
        names = list(adapter_names)
        if len(names) != batch:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch} sequences")
        slots = [-1 if n is None else self.store.slot(n) for n in names]
        # one segment per sequence: a sequence's result does not depend on its neighbours' tenants
        return BatchMetadata(slots, merge=False)

    @staticmethod
    def _batch_size(args, kwargs):
        for k in ("input_ids", "inputs_embeds"):
            if kwargs.get(k) is not None:
                return kwargs[k].shape[0]
        if args and torch.is_tensor(args[0]):
            return args[0].shape[0]
        raise ValueError("cannot tell the batch size: pass input_ids or inputs_embeds")

    def _run(self, fn, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        prev = self._ctx
        self._ctx = self._context(names, self._batch_size(args, kwargs))
        try:
            return fn(*args, **kwargs)
        finally:
            self._ctx = prev

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self._run(self.base_model, args, kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        return self._run(self.base_model.generate, args, kwargs)
