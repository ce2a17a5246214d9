"""RunConfigs: every config of one run, and the plain-key priority order between them."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Set, Tuple

import torch

from shardtune import configs as C
from shardtune.configs.needs import as_text, unmet_clause


@dataclass
class RunConfigs:
    """Every config of one run. ``peft`` and ``dataset`` are the ones selected by train_config."""

    train: C.train_config = field(default_factory=C.train_config)
    fsdp: C.fsdp_config = field(default_factory=C.fsdp_config)
    peft_configs: Dict[str, Any] = field(default_factory=lambda: {k: v() for k, v in C.PEFT_CONFIGS.items()})
    dataset_configs: Dict[str, Any] = field(default_factory=lambda: {k: v() for k, v in C.DATASET_CONFIGS.items()})
    wandb: C.wandb_config = field(default_factory=C.wandb_config)
    quantization: C.quantization_config = field(default_factory=C.quantization_config)
    demo_preset: bool = False  # True when no --model_name was given (configs/presets.py)
    # (config name, field name) of every field given on the command line or in --config (not by the demo preset):
    # a given field that would have no effect is refused (configs/validate.py)
    given: Set[Tuple[str, str]] = field(default_factory=set)

    @property
    def peft(self):
        return self.peft_configs[self.train.peft_method]

    @property
    def dataset(self):
        return self.dataset_configs[self.train.dataset]

    def all_configs(self) -> List[Any]:
        """Every config in the plain-key priority order of the module docstring."""
        peft_names = [self.train.peft_method] if self.train.peft_method in self.peft_configs else []
        peft_names += [n for n in self.peft_configs if n not in peft_names]
        data_names = [self.train.dataset] if self.train.dataset in self.dataset_configs else []
        data_names += [n for n in self.dataset_configs if n not in data_names]
        return ([self.train, self.fsdp] + [self.peft_configs[n] for n in peft_names]
                + [self.dataset_configs[n] for n in data_names] + [self.wandb, self.quantization])

    def by_name(self) -> Dict[str, Any]:
        return {type(c).__name__: c for c in self.all_configs()}

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """The resolved run as plain data: every field that takes effect (configs/needs.py), by config. Fields that
        would do nothing are left out, so that ``--config`` reads the result back without refusing them."""
        out = {}
        for cfg in self.all_configs():
            active = {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg) if unmet_clause(self, cfg, f) is None}
            if active:
                out[type(cfg).__name__] = active
        return out


def _plain(value):
    """A value as YAML holds it: enums by name, dtypes as text, lists as lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (enum.Enum, torch.dtype)):
        return as_text(value)
    return value
