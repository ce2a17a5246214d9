"""Metrics: the JSON-lines file, the trackers it feeds, the per-step log line, and the observer hooks.

One record per line: ``{"kind": "train_step", "step": 12, "loss": ...}``, ``{"kind": "eval_step", ...}``,
``{"kind": "epoch", "epoch": 0, "train_loss": ..., "eval_loss": ...}``. Appending keeps the cost of a
write independent of the run's length (the reference rewrote the whole JSON file every step). Rank 0
owns the file and the trackers: the loop calls ``write`` only there.

``train_step`` fields: step, epoch, loss (token-weighted over the step and all ranks), perplexity, lr,
grad_norm, tokens (supervised, all ranks), input_tokens (all input tokens, all ranks), step_time_s,
tokens_per_s (input tokens per second per GPU/process), model_flops (analytic, all ranks), tflops (per
GPU), mfu (fraction, or null without a known peak), peak_mem_gb (device peak allocated on GPUs, host
peak RSS on CPU), peak_reserved_gb (GPUs: the caching allocator's peak; null on CPU). ``epoch`` fields: epoch, step,
train_loss, train_perplexity, eval_loss, eval_perplexity, epoch_time_s and the memory peaks.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable, Optional


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class MetricsWriter:
    """Appends records to a JSONL file (``path`` None: no file) and hands each to the trackers
    (observability/trackers.py: W&B, TensorBoard), which get ``write(kind, values)`` and ``close()``."""

    def __init__(self, path: Optional[Path], trackers: Iterable[object] = ()):
        self.path = Path(path) if path else None
        self.trackers = list(trackers)
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered

    def write(self, kind: str, **values) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps({"kind": kind, **values}, allow_nan=True) + "\n")
        for tracker in self.trackers:
            tracker.write(kind, values)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def read_metrics(path, kind: str = None) -> list:
    """The records of a metrics file, or of every ``metrics_*.jsonl`` in a folder (in name order, which is
    start-time order: a resumed run appends a new file). ``kind`` keeps one kind ("train_step", "epoch").
    A last line still being written (a live run) is skipped."""
    from pathlib import Path

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("metrics_*.jsonl"))  # no folder yet: no records
    records = []
    for file in files:
        records += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()
                    if line.strip().endswith("}")]
    return [r for r in records if kind is None or r.get("kind") == kind]


class StepObserver:
    """Hooks the training loop calls on every rank (profiler, FLOP counter). Subclasses override what
    they need; ``close`` runs once when training ends, also after an error."""

    def on_step_start(self, state) -> None:
        """Before the first micro-batch of an optimizer step; ``state.step`` = steps done so far."""

    def on_step_end(self, state, record: dict) -> None:
        """After the optimizer step; ``record`` is the step's train_step record."""

    def close(self) -> None:
        """Training is over."""


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def seconds_since_launch() -> float:
    """Seconds since this process started (under torchrun, about the launch: ranks start within a second)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def format_step_line(record: dict, num_epochs: Optional[int] = None) -> str:
    """The per-step log line, e.g.
    ``step 20 | epoch 1/3 | loss 2.3416 | ppl 10.40 | lr 1.00e-04 | grad_norm 0.874 | tok/s/gpu 12.3k (incl.
    padding) | TFLOP/s/gpu 402 | MFU 40.6% | peak_mem 23.4 GB (reserved 25.0)``. MFU is left out when no peak is
    known (CPU); reserved memory is shown on GPUs only."""
    epoch = record["epoch"] + 1
    parts = [f"step {record['step']}", f"epoch {epoch}/{num_epochs}" if num_epochs else f"epoch {epoch}",
             f"loss {record['loss']:.4f}", f"ppl {record['perplexity']:.2f}", f"lr {record['lr']:.2e}",
             f"grad_norm {record['grad_norm']:.3f}"]
    if record.get("tokens_per_s") is not None:  # all input tokens: padding included
        parts.append(f"tok/s/gpu {_si(record['tokens_per_s'])} (incl. padding)")
    if record.get("tflops") is not None:
        parts.append(f"TFLOP/s/gpu {record['tflops']:.3g}")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("peak_mem_gb") is not None:
        reserved = record.get("peak_reserved_gb")
        parts.append(f"peak_mem {record['peak_mem_gb']:.1f} GB" + (f" (reserved {reserved:.1f})" if reserved else ""))
    return " | ".join(parts)


__all__ = ["perplexity", "MetricsWriter", "read_metrics", "StepObserver", "format_step_line", "seconds_since_launch"]
