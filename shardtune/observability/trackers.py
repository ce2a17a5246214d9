"""Experiment trackers: Weights & Biases (--use_wandb) and TensorBoard (--use_tensorboard).

Both are optional extras (``pip install 'shardtune[tracking]'``); :func:`check_trackers` runs before the
model loads and turns a missing package into one ConfigError line. Trackers live on rank 0 only and are
fed by MetricsWriter (observability/metrics.py): every ``train_step`` record becomes ``train/<field>`` scalars at
its step, every ``epoch`` record ``epoch/<field>`` (train) and ``eval/<field>`` scalars at the step where
the epoch ended.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict, List

from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.utils.logging import log

INSTALL = "pip install 'shardtune[tracking]'"
_STEP_FIELDS = ("loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "peak_mem_gb",
                "step_time_s")
_WANDB_MODES = (None, "online", "offline", "disabled", "shared")


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def check_trackers(run: RunConfigs) -> None:
    """Fail early, in one line, when a tracker is asked for but its package is not installed."""
    t = run.train
    if t.use_wandb and _missing("wandb"):
        raise ConfigError(f"--use_wandb needs the wandb package, which is not installed: {INSTALL}")
    if t.use_tensorboard and _missing("tensorboard"):
        raise ConfigError(f"--use_tensorboard needs the tensorboard package, which is not installed: {INSTALL}")
    if t.use_wandb and run.wandb.mode not in _WANDB_MODES:
        raise ConfigError(f"--wandb_config.mode: expected online | offline | disabled, got {run.wandb.mode!r}")


def scalars(kind: str, values: dict) -> Dict[str, float]:
    """The numeric scalars of one metrics record, with tracker tag names."""
    if kind == "train_step":
        out = {f"train/{k}": values[k] for k in _STEP_FIELDS if values.get(k) is not None}
        out["train/epoch"] = values.get("epoch", 0) + 1
        return out
    if kind == "epoch":
        out = {}
        for key, value in values.items():
            if value is None or key in ("epoch", "step") or not isinstance(value, (int, float)):
                continue
            if key.startswith("eval_"):
                out["eval/" + key[len("eval_"):]] = value
            else:
                out["epoch/" + key] = value
        out["epoch/epoch"] = values.get("epoch", 0) + 1
        return out
    return {}


class _Tracker:
    def __init__(self):
        self.last_step = 0

    def _step_of(self, values: dict) -> int:
        step = values.get("step")
        if isinstance(step, int):
            self.last_step = max(self.last_step, step)
        return self.last_step


class WandbTracker(_Tracker):
    def __init__(self, run: RunConfigs, output_dir: Path):
        super().__init__()
        import wandb

        w = run.wandb
        kwargs = {k: v for k, v in dict(project=w.project, entity=w.entity, job_type=w.job_type, tags=w.tags,
                                         group=w.group, notes=w.notes, mode=w.mode).items() if v is not None}
        wandb_dir = Path(os.environ.get("WANDB_DIR") or output_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(wandb_dir), config=run.to_dict(), **kwargs)
        log(f"--> W&B run {self.run.name or self.run.id} ({getattr(self.run.settings, 'mode', w.mode)}) in "
            f"{wandb_dir}")

    def write(self, kind: str, values: dict) -> None:
        data = scalars(kind, values)
        if data:
            self.run.log(data, step=self._step_of(values))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TensorBoardTracker(_Tracker):
    def __init__(self, log_dir: Path):
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        log(f"--> TensorBoard events in {self.log_dir} (tensorboard --logdir {self.log_dir})")

    def write(self, kind: str, values: dict) -> None:
        step = self._step_of(values)
        for tag, value in scalars(kind, values).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def build_trackers(run: RunConfigs, output_dir: Path, is_main: bool) -> List[object]:
    """The trackers asked for, on rank 0 (an empty list elsewhere)."""
    if not is_main:
        return []
    trackers: List[object] = []
    if run.train.use_wandb:
        trackers.append(WandbTracker(run, output_dir))
    if run.train.use_tensorboard:
        trackers.append(TensorBoardTracker(Path(output_dir) / "tensorboard"))
    return trackers


__all__ = ["check_trackers", "build_trackers", "WandbTracker", "TensorBoardTracker", "scalars", "INSTALL"]
