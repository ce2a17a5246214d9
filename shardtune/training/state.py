"""The progress of a run: what a checkpoint records so that a resumed run continues exactly."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """Progress counters; saved in every checkpoint so that a resumed run continues exactly (the divergence check
    included: a resumed run compares with the same reference and smoothed loss as an uninterrupted one)."""

    epoch: int = 0                 # current epoch (0-based)
    step: int = 0                  # optimizer steps done, all epochs
    batches_in_epoch: int = 0      # micro-batches of the current epoch already consumed
    best_eval_loss: float = math.inf
    tokens_seen: int = 0           # supervised tokens trained on, all ranks
    epoch_loss_sum: float = 0.0    # this epoch's summed loss and supervised tokens so far, so that a
    epoch_tokens: float = 0.0      # resumed epoch reports the same epoch loss as an uninterrupted one
    skipped_steps: int = 0         # steps not applied because their loss or gradient norm was not finite
    # The divergence check (training/divergence.py): a token-weighted moving average of the step losses kept
    # as its decayed loss sum and token count, the first step's loss and the best smoothed loss so far.
    smoothed_loss_sum: float = 0.0
    smoothed_tokens: float = 0.0
    start_loss: float = 0.0        # the loss of the first step applied (the model as it was given)
    best_smoothed_loss: float = math.inf
    best_smoothed_step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)
