"""One-off validation of a whole adapted model's index tables (issue 11: no per-call host syncs).

Per-call value checks of index tables are off for GPU tensors, so tables are validated once where
they are created or loaded. :func:`validate_mos_tables` walks every :class:`~mos_ext.layers.MoSLinear`
of a model and checks each adapter's ``mos_idx_a`` / ``mos_idx_b`` against the rows of the pools
they index (one device reduction and one scalar sync per table on a GPU).
"""
from __future__ import annotations

from typing import Optional

import torch

from .layers import MoSLinear

__all__ = ["validate_mos_tables"]


def validate_mos_tables(model: torch.nn.Module, adapter_name: Optional[str] = None) -> int:
    """Check every MoS table of ``model`` (of one adapter, or all): entries ``-1`` or in
    ``[0, pool rows)``. Raises ``ValueError`` naming the module, the table and the first bad
    entry; returns the number of tables checked. Reads pools through the pool bank directly
    (no gradient taps)."""
    return sum(m.validate_tables(adapter_name, path) for path, m in model.named_modules() if isinstance(m, MoSLinear))
