"""The training loop, read top to bottom: :meth:`Trainer.train` runs the epochs, :meth:`Trainer.train_epoch` its
optimizer steps, :meth:`Trainer.after_step` what follows each applied step (record, divergence check, checkpoint,
preemption, step limit) and :meth:`Trainer.end_epoch` the epoch's end (LR decay, evaluation, checkpoint and export).

How a step computes (token-weighted loss over gradient accumulation and ranks, one host-device synchronisation,
non-finite steps skipped) is in training/step.py; evaluation in training/evaluate.py; the records and log lines in
training/record.py; the divergence check in training/divergence.py.
"""
from __future__ import annotations

import math
import time
from typing import Iterator, List, Optional

import torch
from tqdm import tqdm

from shardtune.errors import TrainingDiverged
from shardtune.observability.memory import MemoryTracker
from shardtune.training.context import TrainContext
from shardtune.training.divergence import check_divergence
from shardtune.training.evaluate import evaluate
from shardtune.training.record import StepRecorder, record_epoch, run_summary
from shardtune.training.state import POSITION_FROM_BATCHES, TrainState
from shardtune.training.step import StepResult, optimizer_step, take_micro_batches
from shardtune.utils import distributed
from shardtune.utils.logging import log
from shardtune.utils.rng import preserved_rng

__all__ = ["TrainContext", "Trainer", "train"]


def train(model, train_loader, eval_loader, optimizer, lr_scheduler, ctx: TrainContext,
          state: Optional[TrainState] = None) -> dict:
    """Run all epochs (from ``state`` when resuming). Returns a summary dict of losses, perplexities and timings."""
    return Trainer(model, train_loader, eval_loader, optimizer, lr_scheduler, ctx, state).train()


class Trainer:
    """One run's loop over its epochs; ``state`` (a checkpoint's, when resuming) is updated as it goes."""

    def __init__(self, model: torch.nn.Module, train_loader, eval_loader, optimizer, lr_scheduler, ctx: TrainContext,
                 state: Optional[TrainState] = None):
        self.model, self.train_loader, self.eval_loader = model, train_loader, eval_loader
        self.optimizer, self.lr_scheduler, self.ctx = optimizer, lr_scheduler, ctx
        self.sampler = train_loader.batch_sampler  # data/sampler.py: the epoch's order and the data position
        self.batches_at_start = 0  # state.batches_in_epoch when this process started the epoch's iterator
        self.steps_taken = 0  # optimizer steps (applied or skipped) this process has run
        self.t = ctx.run.train
        self.state = state or TrainState()
        self.memory = MemoryTracker(ctx.device)  # peaks from the allocator and the kernel: no polling thread
        self.recorder = StepRecorder(ctx, self.memory)
        self.train_losses: List[float] = []  # per epoch, token-weighted
        self.eval_losses: List[float] = []
        self.epoch_times: List[float] = []

    def train(self) -> dict:
        try:
            for epoch in range(self.state.epoch, self.t.num_epochs):
                self.state.epoch = epoch
                self.model.train()
                self.memory.start_epoch()
                epoch_start = time.perf_counter()
                stop = self.train_epoch()
                self.end_epoch(epoch_start)
                if stop:
                    break
        except TrainingDiverged:  # every rank raises it at the same step: a checkpoint still being written is sealed
            self.finish_saves()
            raise
        self.finish_saves()  # the run is done when its last checkpoint is on disk
        summary = run_summary(self.state, self.train_losses, self.eval_losses, self.epoch_times, self.memory)
        # Where the data stands (the epoch under way: 0 samples when the last one was completed); state.json holds it
        summary["data_position"] = {"epoch": self.state.epoch, "samples_in_epoch": self.state.samples_in_epoch,
                                    "tokens_in_epoch": self.state.tokens_in_epoch,
                                    "epoch_size": self.sampler.epoch_size()}
        return summary

    def finish_saves(self) -> None:
        if self.ctx.save_checkpoint:
            self.ctx.save_checkpoint(self.state, "finish")

    def train_epoch(self) -> bool:
        """The optimizer steps of ``state.epoch``, from where it stands. True: the run is to stop after this epoch's
        end (--max_train_step reached)."""
        state, ga, phases = self.state, self.t.gradient_accumulation_steps, self.ctx.telemetry.phases
        batches = self.epoch_batches()
        with tqdm(total=math.ceil((state.batches_in_epoch + len(self.train_loader)) / ga), initial=state.batches_in_epoch // ga,
                  desc=f"Training epoch {state.epoch + 1}/{self.t.num_epochs}", dynamic_ncols=True,
                  disable=not distributed.is_main()) as progress:  # closed on errors too: their line stands alone
            while not self.reached_max_train_step():
                phases.end_startup()  # (once) launch to here is startup
                # The first step of this process pays the one-off costs (compile, warm-up): a phase of its own
                with phases.time("training" if self.steps_taken else "first_step"):
                    step_start = time.perf_counter()
                    micro_batches = take_micro_batches(batches, ga)
                    if not micro_batches:
                        return False
                    for obs in self.ctx.telemetry.observers:
                        obs.on_step_start(state)
                    result = optimizer_step(self.model, micro_batches, self.optimizer, self.ctx, state)
                    self.steps_taken += 1
                    state.samples_in_epoch = self.sampler.position_after(state.batches_in_epoch - self.batches_at_start)
                    if not result.applied:
                        progress.update(1)
                        continue
                    seq_len = int(micro_batches[0]["input_ids"].shape[-1])
                    if self.after_step(result, seq_len, time.perf_counter() - step_start, progress):
                        return True
        return True  # a resumed run that had reached --max_train_step already

    def epoch_batches(self) -> Iterator:
        """This epoch's micro-batches from the data position on (a run resumed mid-epoch continues after the samples
        trained on, on any number of ranks), and the RNG restored where the stopped run stood."""
        state, sampler = self.state, self.sampler
        sampler.set_epoch(state.epoch)
        if state.samples_in_epoch == POSITION_FROM_BATCHES:  # an older checkpoint: taken with this very layout
            state.samples_in_epoch = sampler.position_after(state.batches_in_epoch)
        state.order_batch_size = state.order_batch_size or sampler.batch_size
        sampler.start_at(state.samples_in_epoch, state.order_batch_size)
        state.batches_in_epoch = max(0, math.ceil(sampler.num_batches() / sampler.num_replicas) - len(sampler))
        self.batches_at_start = state.batches_in_epoch
        batches = iter(self.train_loader)
        if self.ctx.restore_rng is not None:  # after iter(): creating the iterator drew its seed, as it did before
            self.ctx.restore_rng()
            self.ctx.restore_rng = None
        return batches

    def after_step(self, result: StepResult, seq_len: int, step_time: float, progress: tqdm) -> bool:
        """Record the step, stop a diverged run, checkpoint, honour a stop signal. True: --max_train_step reached."""
        state, ctx = self.state, self.ctx
        record = self.recorder.record(state, result, seq_len, step_time, self.optimizer.param_groups[0]["lr"],
                                      progress)
        progress.update(1)
        for obs in ctx.telemetry.observers:
            obs.on_step_end(state, record)
        # Before anything of this step is saved. The loss is global, so every rank raises at the same step.
        check_divergence(state, result.loss_sum, result.tokens.supervised, self.t)
        if ctx.save_checkpoint:
            ctx.save_checkpoint(state, "poll")  # seal a checkpoint written in the background once it is on disk
        saved = None  # this step's checkpoint folder, when one is written (None also while written in the background)
        if ctx.save_checkpoint and self.t.save_every_n_steps and state.step % self.t.save_every_n_steps == 0:
            with ctx.telemetry.phases.time("checkpoints"):
                saved = ctx.save_checkpoint(state, "step")
        if ctx.stop_request is not None:
            ctx.stop_request.after_step(state, ctx, saved)  # a stop signal: checkpoint, raise Preempted
        if self.reached_max_train_step():
            log(f"--> reached max_train_step={self.t.max_train_step}; stopping")
            return True
        return False

    def reached_max_train_step(self) -> bool:
        return bool(self.t.max_train_step) and self.state.step >= self.t.max_train_step

    def end_epoch(self, epoch_start: float) -> None:
        """Token-weighted epoch loss, LR decay, evaluation, the epoch's record, checkpoint (and export)."""
        state, t, epoch = self.state, self.t, self.state.epoch
        train_loss = state.epoch_loss_sum / max(state.epoch_tokens, 1.0)
        self.train_losses.append(train_loss)
        self.epoch_times.append(time.perf_counter() - epoch_start)
        epoch_done = state.samples_in_epoch >= self.sampler.epoch_size()
        if epoch_done:  # an epoch cut short by max_train_step keeps its LR, so resuming it continues exactly
            self.lr_scheduler.step()
        eval_loss = None
        if self.eval_loader is not None and t.run_validation:
            with preserved_rng(self.ctx.device), self.ctx.telemetry.phases.time("evaluation"):
                # preserved RNG: a checkpoint taken after evaluation continues like the run
                eval_loss = evaluate(self.model, self.eval_loader, self.ctx, state)
            self.eval_losses.append(eval_loss)
        if epoch_done:
            state.start_epoch(epoch + 1)
        improved = eval_loss is not None and eval_loss < state.best_eval_loss
        if improved:
            state.best_eval_loss = eval_loss
        record_epoch(self.ctx, state, epoch, train_loss, eval_loss, improved, self.epoch_times[-1],
                     self.memory.epoch_stats())  # this epoch's peaks, evaluation included
        if self.ctx.save_checkpoint and t.save_model:
            with self.ctx.telemetry.phases.time("checkpoints"):  # an export inside it is timed as export
                self.ctx.save_checkpoint(state, "best" if improved or eval_loss is None else "epoch")
