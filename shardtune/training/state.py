"""The progress of a run: what a checkpoint records so that a resumed run continues exactly.

The data position is ``samples_in_epoch``: samples (packed blocks when packing) of the epoch consumed by all ranks
together, a prefix of the epoch's one sample order (data/sampler.py), so it means the same on any number of ranks.
``batches_in_epoch`` counts this run's micro-batches per rank, for the progress bar; after a resume on another
layout it is the count that layout would have reached at the same position."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

POSITION_FROM_BATCHES = -1  # samples_in_epoch of a checkpoint written before it was recorded: batches_in_epoch
#                             (then the layout is the saved one, model_checkpointing/resume.py) gives it


@dataclass
class TrainState:
    """Progress counters; saved in every checkpoint so that a resumed run continues exactly (the divergence check
    included: a resumed run compares with the same reference and smoothed loss as an uninterrupted one)."""

    epoch: int = 0                 # current epoch (0-based)
    step: int = 0                  # optimizer steps done, all epochs
    batches_in_epoch: int = 0      # micro-batches of the current epoch already consumed, per rank
    samples_in_epoch: int = 0      # the data position: samples / packed blocks of the epoch consumed, all ranks
    tokens_in_epoch: int = 0       # supervised tokens of those samples, all ranks (skipped steps included)
    order_batch_size: int = 0      # the batch size the epoch's sample order was formed with (length-grouped
    #                                batches depend on it; 0: not started). A resumed epoch keeps it.
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

    def start_epoch(self, epoch: int) -> None:
        """The next epoch from its beginning."""
        self.epoch, self.batches_in_epoch, self.samples_in_epoch, self.tokens_in_epoch = epoch, 0, 0, 0
        self.order_batch_size = 0
        self.epoch_loss_sum, self.epoch_tokens = 0.0, 0.0

    def to_dict(self) -> dict:
        return asdict(self)
