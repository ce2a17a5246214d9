"""--use_profiler: one torch.profiler session for the whole run, with a wait/warmup/active schedule.

Every rank writes its own trace, ``<profiler_dir>/rank<R>.<time>.pt.trace.json``, through
``tensorboard_trace_handler``: ``tensorboard --logdir <profiler_dir>/..`` with the torch-tb-profiler
plugin shows it (run name: the folder), and chrome://tracing or https://ui.perfetto.dev open the JSON
directly. CPU activity is always recorded, CUDA activity on GPUs; memory and shapes too.
Schedule: the profiler skips ``profiler_wait`` optimizer steps, warms up for ``profiler_warmup`` steps and
records ``profiler_active`` steps, once (the reference made a new profiler every epoch).
"""
from __future__ import annotations

from pathlib import Path

import torch

from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.observability.metrics import StepObserver
from shardtune.utils import distributed
from shardtune.utils.logging import log, warn


def profiler_dir(run: RunConfigs) -> Path:
    t = run.train
    return Path(t.profiler_dir) if t.profiler_dir else Path(t.output_dir) / "profiler"


def check_profiler_config(run: RunConfigs) -> None:
    """Before anything loads: schedule values, and a warning when the run is too short to record."""
    t = run.train
    if not t.use_profiler:
        return
    for name in ("profiler_wait", "profiler_warmup"):
        if getattr(t, name) < 0:
            raise ConfigError(f"--{name}: must be >= 0, got {getattr(t, name)}")
    if t.profiler_active < 1:
        raise ConfigError(f"--profiler_active: must be >= 1, got {t.profiler_active}")
    needed = t.profiler_wait + t.profiler_warmup + t.profiler_active
    if 0 < t.max_train_step < needed:
        warn(f"--use_profiler: the schedule needs {needed} steps (wait {t.profiler_wait} + warmup "
             f"{t.profiler_warmup} + active {t.profiler_active}) but --max_train_step is {t.max_train_step}; the "
             f"trace will hold only the steps that ran")


class Profiler(StepObserver):
    """Starts on construction, steps the schedule after every optimizer step, writes on close."""

    def __init__(self, out_dir: Path, wait: int, warmup: int, active: int, device: torch.device):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = distributed.info().rank
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=activities,
                            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                            on_trace_ready=tensorboard_trace_handler(str(self.out_dir), worker_name=f"rank{rank}"),
                            record_shapes=True, profile_memory=True, with_stack=False, with_flops=True)
        self.prof.start()
        log(f"--> profiler: wait {wait}, warmup {warmup}, active {active} steps; traces in {self.out_dir} "
            f"(one per rank)")

    def on_step_end(self, state, record: dict) -> None:
        self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()  # writes the trace if the run ended while recording
            self.prof = None
            traces = sorted(self.out_dir.glob(f"rank{distributed.info().rank}.*.pt.trace.json*"))
            if traces:
                log(f"--> profiler trace: {traces[-1]} (tensorboard --logdir {self.out_dir.parent})")
            else:
                warn("--use_profiler: no trace was written (the run ended before the schedule's active steps)")


def build_profiler(run: RunConfigs, device: torch.device) -> Profiler:
    t = run.train
    return Profiler(profiler_dir(run), t.profiler_wait, t.profiler_warmup, t.profiler_active, device)


__all__ = ["Profiler", "build_profiler", "check_profiler_config", "profiler_dir"]
