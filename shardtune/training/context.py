"""What the training loop needs besides model, data and optimizer, grouped by what it is for. ``finetuning.main``
builds it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, List, Optional, Protocol

import torch

from shardtune.configs.run import RunConfigs
from shardtune.observability.flops import ModelFlops
from shardtune.observability.metrics import MetricsWriter, StepObserver
from shardtune.observability.phases import PhaseTimer
from shardtune.training.preemption import StopRequest
from shardtune.training.state import TrainState


def _no_gradient_sync_control(model: torch.nn.Module, sync: bool) -> None:
    """One process: there is no gradient reduction to hold back."""


@dataclass
class StepNumerics:
    """How a step computes: the forward's precision, fp16's loss scaling, when gradients are reduced."""

    autocast: Callable[[], ContextManager] = contextlib.nullcontext  # a context for every forward pass
    scaler: Optional[torch.amp.GradScaler] = None  # fp16_mixed only
    # (model, sync): FSDP turns off gradient reduction on all but the last micro-batch of a step
    set_gradient_sync: Callable[[torch.nn.Module, bool], None] = _no_gradient_sync_control


@dataclass
class Telemetry:
    """What watches the run: the metrics file and trackers (rank 0 writes), observers (every rank), throughput."""

    metrics: MetricsWriter = field(default_factory=lambda: MetricsWriter(None))
    # profiler, FLOP counter: .on_step_start(state), .on_step_end(state, record), .close() on every rank
    observers: List[StepObserver] = field(default_factory=list)
    model_flops: Optional[ModelFlops] = None  # analytic FLOPs for TFLOP/s and MFU; None: not reported
    peak_tflops: Optional[float] = None       # the accelerator's dense bf16 peak (observability/mfu.py); None: no MFU
    phases: PhaseTimer = field(default_factory=PhaseTimer)  # wall time by phase (the loop times its parts)


class SaveCheckpoint(Protocol):
    """(state, reason) -> the checkpoint folder written; reason is "step", "preempt", "epoch", "best", or "poll" and
    "finish" for a checkpoint written in the background (see Checkpointer.__call__)
    (model_checkpointing.checkpoint.Checkpointer, guarded against full disks by utils/disk.guard_saves)."""

    def __call__(self, state: TrainState, reason: str) -> Path: ...


@dataclass
class TrainContext:
    run: RunConfigs
    device: torch.device
    numerics: StepNumerics = field(default_factory=StepNumerics)
    telemetry: Telemetry = field(default_factory=Telemetry)
    save_checkpoint: Optional[SaveCheckpoint] = None  # None: nothing is saved
    # Resuming mid-epoch: restores the checkpoint's RNG state once the epoch's data iterator exists (creating it
    # draws a seed from the global RNG, as it did before the checkpoint was taken). Called once.
    restore_rng: Optional[Callable[[], None]] = None
    # After every step all ranks agree whether a SIGTERM / SIGINT asks to stop (training/preemption.py)
    stop_request: Optional[StopRequest] = None
