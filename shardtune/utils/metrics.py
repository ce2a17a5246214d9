"""Metrics written as JSON lines, appended as training goes (rank 0 owns the file).

One record per line: ``{"kind": "train_step", "step": 12, "loss": ...}``, ``{"kind": "eval_step", ...}``,
``{"kind": "epoch", "epoch": 0, "train_loss": ..., "eval_loss": ...}``. Appending keeps the cost of a
write independent of the run's length (the reference rewrote the whole JSON file every step).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class MetricsWriter:
    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path else None
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered

    def write(self, kind: str, **values) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps({"kind": kind, **values}) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path) -> list:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
