"""MoSConfig: the hyper-parameters of a sharded adapter, as a ``peft.PeftConfig``.

``peft.get_peft_model(model, MoSConfig(...))`` builds a MoS (or LoRA-as-shards, MiSS, MiSS-mini)
adapter; ``save_pretrained`` writes this config as ``adapter_config.json`` with
``"peft_type": "MOS"``. The fields, their checks and the pool layout are :class:`mos_ext.layout.MoSHyper`'s;
this class adds PEFT's fields. Data only: reading an adapter directory is the tuner's job.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ._peft import PeftConfig, mos_peft_type
from .layout import DEFAULT_TARGETS, EMBEDDING_NAMES, FORMAT_VERSION, METHODS, MoSHyper

__all__ = ["MoSConfig", "METHODS", "DEFAULT_TARGETS", "EMBEDDING_NAMES", "FORMAT_VERSION"]


@dataclass
class MoSConfig(MoSHyper, PeftConfig):
    """:class:`~mos_ext.layout.MoSHyper` as a PEFT config (see there for the fields)."""

    def __post_init__(self):
        PeftConfig.__post_init__(self)
        self.peft_type = mos_peft_type()
        self.check_hyper()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs) -> "MoSConfig":
        """PEFT's config loader; a local directory is remembered (``mos_source``, not saved) so that the
        tuner reads and validates the whole adapter before it changes any module."""
        cfg = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if isinstance(cfg, MoSConfig) and os.path.isdir(os.fspath(path)):
            cfg.mos_source = os.fspath(path)
        return cfg
