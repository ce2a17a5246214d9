"""Stopping a run whose loss diverges while staying finite (a non-finite loss is caught by the step itself).

A too-high learning rate rarely gives NaN at once: the loss jumps far above where it started and stays there
(the bundled demo at ``--lr 1``: 7.65 at step 1, 59 at step 2, 140 by the end). Such a run must not end with a
saved model and exit status 0. After every applied step the loop calls :func:`check_divergence`, which

* smooths the step losses: a token-weighted exponential moving average (each step's summed loss and
  supervised tokens decay by :data:`SMOOTHING` per step, so a batch with few tokens moves it little, and the
  first steps need no bias correction: the average is a ratio of two sums that start at 0);
* stops when the smoothed loss exceeds ``divergence_factor`` times the loss of the first step (the model as it
  was given: fine-tuning only lowers it; the smoothing keeps a single noisy batch from tripping it);
* with ``divergence_patience_steps`` N, also stops when the smoothed loss has not fallen below its best for N
  steps (off by default: a healthy run may plateau, and how long depends on the run's data and length).

Every rank takes the same decision without a collective: the step loss and token count it is fed are the global
ones (already all-reduced over ranks, bit-identical on every rank), and the state is in TrainState, which every
rank updates alike and every checkpoint saves, so a resumed run decides as the uninterrupted one would.
"""
from __future__ import annotations

from shardtune.configs.training import train_config
from shardtune.errors import TrainingDiverged
from shardtune.training.state import TrainState

# Weight of the previous smoothed loss at each step: the average spans about 1 / (1 - 0.9) = 10 steps, enough to
# quiet batch-to-batch noise, short enough that a divergence stops the run within a few steps.
SMOOTHING = 0.9

ADVICE = "the run stops without saving these weights; lower --lr (or add --gradient_clipping) and rerun"


def smoothed_loss(state: TrainState) -> float:
    return state.smoothed_loss_sum / state.smoothed_tokens


def check_divergence(state: TrainState, loss_sum: float, tokens: float, t: train_config) -> None:
    """Fold one applied step (its global summed loss and supervised tokens) into the smoothed loss; raise
    :class:`TrainingDiverged` when the loss diverged. Call before anything of this step is saved."""
    if tokens <= 0:  # a step of padding only (a short rank's filler batches everywhere) says nothing
        return
    if state.smoothed_tokens == 0:
        state.start_loss = loss_sum / tokens
    state.smoothed_loss_sum = SMOOTHING * state.smoothed_loss_sum + loss_sum
    state.smoothed_tokens = SMOOTHING * state.smoothed_tokens + tokens
    smoothed = smoothed_loss(state)
    if smoothed < state.best_smoothed_loss:
        state.best_smoothed_loss, state.best_smoothed_step = smoothed, state.step

    factor = t.divergence_factor
    if factor and state.start_loss > 0 and smoothed > factor * state.start_loss:
        raise TrainingDiverged(f"training diverged at step {state.step}: the smoothed loss {smoothed:.4g} is "
                               f"{smoothed / state.start_loss:.3g} times the first step's {state.start_loss:.4g} "
                               f"(--divergence_factor {factor:g}); {ADVICE}")
    patience = t.divergence_patience_steps
    if patience and state.step - state.best_smoothed_step >= patience:
        raise TrainingDiverged(f"training diverged at step {state.step}: the smoothed loss {smoothed:.4g} has not "
                               f"fallen below its best {state.best_smoothed_loss:.4g} (step "
                               f"{state.best_smoothed_step}) for {patience} steps (--divergence_patience_steps "
                               f"{patience}); {ADVICE}")
