"""Experiment trackers: Weights & Biases (--use_wandb), TensorBoard (--use_tensorboard) and the PNG plots.

Both are optional extras (``pip install 'shardtune[tracking]'``); :func:`check_trackers` runs before the
model loads and turns a missing package into one ConfigError line. Trackers live on rank 0 only and are
fed by MetricsWriter (observability/metrics.py): every ``train_step`` record becomes ``train/<field>`` scalars at
its step, every ``epoch`` record ``epoch/<field>`` (train) and ``eval/<field>`` scalars at the step where
the epoch ended. The plots (on by default with --save_metrics) are redrawn from the metrics file into
``<output_dir>/plots/`` after each evaluation and when the run ends; without matplotlib the run warns once and
goes on without them.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict, List

from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.observability.plots import INSTALL, plot
from shardtune.utils.logging import log, warn

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


class PlotsTracker:
    """Redraws the PNGs of observability/plots.py from the run's metrics file (already flushed: MetricsWriter
    writes a record to the file before handing it to the trackers) after each evaluation and at close. The
    evaluation that ends the run is left to close, which follows at once: one redraw, not two."""

    def __init__(self, metrics_path: Path, plots_dir: Path, num_epochs: int, max_train_step: int):
        self.metrics_path, self.plots_dir = Path(metrics_path), Path(plots_dir)
        self.num_epochs, self.max_train_step = num_epochs, max_train_step
        self.records = 0  # nothing written: nothing to draw (a run that failed before its first step)
        self.drawn_at = -1  # records count at the last redraw

    def _ends_run(self, values: dict) -> bool:
        last_epoch = values.get("epoch", 0) + 1 >= self.num_epochs
        return last_epoch or bool(self.max_train_step and (values.get("step") or 0) >= self.max_train_step)

    def write(self, kind: str, values: dict) -> None:
        self.records += 1
        if kind == "epoch" and not self._ends_run(values):
            self.redraw()

    def redraw(self) -> None:
        if self.records == 0 or self.drawn_at == self.records:
            return
        self.drawn_at = self.records
        try:
            plot(self.metrics_path, self.plots_dir)
        except Exception as exc:  # the plots are a convenience: a failure to draw them must not end the run
            warn(f"could not draw the plots in {self.plots_dir} ({type(exc).__name__}: {exc}); the metrics are in "
                 f"{self.metrics_path}")
            self.records = self.drawn_at = -1  # no further attempts (and no second warning)

    def close(self) -> None:
        self.redraw()


def build_trackers(run: RunConfigs, output_dir: Path, is_main: bool, metrics_path: Path = None) -> List[object]:
    """The trackers asked for, on rank 0 (an empty list elsewhere); the plots whenever there is a metrics file."""
    if not is_main:
        return []
    trackers: List[object] = []
    if metrics_path is not None:
        if _missing("matplotlib"):
            warn(f"no plots in {Path(output_dir) / 'plots'}: they need matplotlib ({INSTALL}); the metrics are in "
                 f"{metrics_path}")
        else:
            trackers.append(PlotsTracker(metrics_path, Path(output_dir) / "plots", run.train.num_epochs,
                                         run.train.max_train_step))
    if run.train.use_wandb:
        trackers.append(WandbTracker(run, output_dir))
    if run.train.use_tensorboard:
        trackers.append(TensorBoardTracker(Path(output_dir) / "tensorboard"))
    return trackers


__all__ = ["check_trackers", "build_trackers", "WandbTracker", "TensorBoardTracker", "PlotsTracker", "scalars",
           "INSTALL"]
