"""The training loop, in one place: token counting, loss scaling, accumulation, clipping, the optimizer
step, logging, evaluation and checkpoints are all visible here.

Loss convention: every optimizer step minimises the mean cross-entropy over *all* supervised tokens of
that step (every micro-batch, every rank). Each micro-batch's summed loss is divided by the step's
global token count before backward, so ``batch_size_training=2, gradient_accumulation_steps=4`` gives
the same loss and gradients as ``8 x 1``, and 2 ranks with batch b equal 1 rank with batch 2b.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, List, Optional

import torch
from tqdm import tqdm

from shardtune.configs.run import RunConfigs
from shardtune.errors import TrainingDiverged
from shardtune.models.loss import count_supervised_tokens
from shardtune.observability.memory import (GB, MemoryTracker, device_peak_allocated_bytes, device_peak_reserved_bytes,
                                            host_peak_rss_bytes)
from shardtune.observability.metrics import (MetricsWriter, StepObserver, format_step_line, perplexity,
                                             seconds_since_launch)
from shardtune.training.state import TrainState
from shardtune.utils import distributed
from shardtune.utils.logging import log
from shardtune.utils.rng import preserved_rng


@dataclass
class TrainContext:
    """What the loop needs besides model, data and optimizer. ``finetuning.main`` builds it."""

    run: RunConfigs
    device: torch.device
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    scaler: Optional[object] = None  # torch.amp.GradScaler for fp16
    metrics: MetricsWriter = field(default_factory=lambda: MetricsWriter(None))
    # (model, sync: bool) -> None; FSDP turns off gradient reduction on non-final micro-steps
    set_gradient_sync: Callable[[torch.nn.Module, bool], None] = lambda model, sync: None
    # (state, reason) -> the checkpoint folder written; reason is "epoch", "step" or "best"
    save_checkpoint: Optional[Callable[[TrainState, str], object]] = None
    # profiler, FLOP counter: .on_step_start(state), .on_step_end(state, record), .close() on every rank
    observers: List[StepObserver] = field(default_factory=list)
    model_flops: Optional[object] = None  # observability/flops.ModelFlops: analytic FLOPs for TFLOP/s and MFU
    peak_tflops: Optional[float] = None   # accelerator dense bf16 peak (observability/mfu.py); None: no MFU
    # resume mid-epoch: restores the checkpoint's RNG state once the epoch's data iterator exists
    # (creating it draws a seed from the global RNG, as it did before the checkpoint was taken)
    restore_rng: Optional[Callable[[], None]] = None
    # utils/preemption.StopRequest: after every step, all ranks agree whether a SIGTERM / SIGINT asks to stop
    stop_request: Optional[object] = None


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _take(it: Iterator, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def clip_and_measure_grad_norm(model: torch.nn.Module, max_norm: Optional[float],
                               device: torch.device) -> torch.Tensor:
    """Global L2 norm of the gradients (over all ranks for sharded params), as a 0-d tensor on ``device`` (read
    it together with the step's loss: one host-device synchronisation); clips when max_norm is set."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor (FSDP2)
        norm = norm.full_tensor()
    return norm


def train(model, train_loader, eval_loader, optimizer, lr_scheduler, ctx: TrainContext,
          state: Optional[TrainState] = None) -> dict:
    """Run all epochs. Returns a summary dict of losses, perplexities and timings."""
    t = ctx.run.train
    state = state or TrainState()
    ga = t.gradient_accumulation_steps
    world = distributed.info().world_size
    clip = t.gradient_clipping_threshold if t.gradient_clipping and t.gradient_clipping_threshold > 0 else None
    epoch_train_losses, epoch_eval_losses, epoch_times = [], [], []
    memory = MemoryTracker(ctx.device)  # peaks from the allocator and the kernel: no polling thread
    stop = False
    first_step_reported = False

    for epoch in range(state.epoch, t.num_epochs):
        if stop:
            break
        state.epoch = epoch
        if hasattr(train_loader.batch_sampler, "set_epoch"):
            train_loader.batch_sampler.set_epoch(epoch)
        model.train()
        memory.start_epoch()
        epoch_start = time.perf_counter()
        epoch_loss_sum = torch.tensor(state.epoch_loss_sum, dtype=torch.float64, device=ctx.device)  # 0 unless
        epoch_tokens = torch.tensor(state.epoch_tokens, dtype=torch.float64, device=ctx.device)      # resumed
        batches = iter(train_loader)
        for _ in range(state.batches_in_epoch):  # resume mid-epoch: skip what was already trained on
            next(batches)
        if ctx.restore_rng is not None:
            ctx.restore_rng()
            ctx.restore_rng = None
        steps_in_epoch = math.ceil(len(train_loader) / ga)
        pbar = tqdm(total=steps_in_epoch, initial=state.batches_in_epoch // ga, desc=f"Training epoch {epoch + 1}/"
                    f"{t.num_epochs}", dynamic_ncols=True, disable=not distributed.is_main())

        while not stop:
            if t.max_train_step and state.step >= t.max_train_step:  # a resumed run that reached it already
                stop = True
                break
            step_start = time.perf_counter()
            micro_batches = _take(batches, ga)
            if not micro_batches:
                break
            for obs in ctx.observers:
                obs.on_step_start(state)
            # 1. Count the step's supervised tokens over all micro-batches and ranks, before any backward;
            #    with them (one all-reduce) the input tokens and analytic FLOPs for throughput and MFU. The batches
            #    are still in host memory and so is the sum: the GPU goes on with the previous step meanwhile.
            local_tokens = sum(int(count_supervised_tokens(b["labels"])) for b in micro_batches)
            local_inputs = sum(b["input_ids"].numel() for b in micro_batches)
            local_flops = sum(ctx.model_flops.batch(b["input_ids"].shape) for b in micro_batches) \
                if ctx.model_flops else 0.0
            global_tokens, global_inputs, global_flops = distributed.sum_on_host([local_tokens, local_inputs,
                                                                                  local_flops])
            # FSDP/DDP average gradients over ranks; multiplying by world cancels that, so the result is
            # sum(loss) / global_tokens exactly.
            scale = world / max(global_tokens, 1.0)

            # 2. Forward/backward every micro-batch; gradients are reduced only on the last one.
            step_loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
            for i, batch in enumerate(micro_batches):
                ctx.set_gradient_sync(model, i == len(micro_batches) - 1)
                batch = to_device(batch, ctx.device)
                with ctx.autocast():
                    out = model(**batch)
                loss = out.loss_sum * scale
                if ctx.scaler is not None:
                    ctx.scaler.scale(loss).backward()
                else:
                    loss.backward()
                step_loss_sum += out.loss_sum.detach()

            # 3. Unscale (fp16), measure and clip the gradient norm; the step's token-weighted loss over all
            #    ranks. Both are global, so every rank takes the same decision below.
            if ctx.scaler is not None:
                ctx.scaler.unscale_(optimizer)
            grad_norm = clip_and_measure_grad_norm(model, clip, ctx.device)
            global_loss_sum = distributed.all_reduce_sum(step_loss_sum.double())
            # The step's one host-device synchronisation, for both numbers (a skip decision needs them).
            grad_norm, global_loss_sum = torch.stack([grad_norm.to(global_loss_sum), global_loss_sum]).tolist()
            step_loss = global_loss_sum / max(global_tokens, 1.0)

            # 4. A diverged step is never applied (the fp16 scaler skips overflowing gradients itself).
            if not math.isfinite(step_loss) or (ctx.scaler is None and not math.isfinite(grad_norm)):
                state.skipped_steps += 1
                state.batches_in_epoch += len(micro_batches)
                optimizer.zero_grad(set_to_none=True)
                if ctx.scaler is not None:
                    ctx.scaler.update()
                what = f"step {state.step + 1}: loss {step_loss:.4g}, gradient norm {grad_norm:.4g}"
                if state.skipped_steps > t.max_nonfinite_steps:
                    pbar.close()  # the error line then starts a line of its own
                    raise TrainingDiverged(f"training diverged at {what} (not finite); stopped without saving it "
                                           f"(lower --lr, add --gradient_clipping, or skip such steps with "
                                           f"--max_nonfinite_steps N)")
                log(f"--> {what} not finite: step skipped ({state.skipped_steps} of at most "
                    f"{t.max_nonfinite_steps} allowed by --max_nonfinite_steps)")
                pbar.update(1)
                continue

            # 5. Step, reset.
            if ctx.scaler is not None:
                ctx.scaler.step(optimizer)
                ctx.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # 6. Bookkeeping.
            epoch_loss_sum += global_loss_sum
            epoch_tokens += global_tokens
            state.step += 1
            state.batches_in_epoch += len(micro_batches)
            state.tokens_seen += int(global_tokens)
            state.epoch_loss_sum += global_loss_sum
            state.epoch_tokens += global_tokens
            step_time = time.perf_counter() - step_start
            lr = optimizer.param_groups[0]["lr"]
            # 7. Throughput per GPU (process): all input tokens, padding included, and analytic TFLOP/s; MFU
            #    against the accelerator's peak. Peak memory: device allocated on GPUs, host RSS on CPU.
            tflops = global_flops / world / step_time / 1e12 if ctx.model_flops else None
            peak_mem = device_peak_allocated_bytes(ctx.device) or host_peak_rss_bytes()
            memory.sample()  # the host's per-epoch peak when the epoch stays under the process' high-water mark
            record = dict(step=state.step, epoch=epoch, loss=step_loss, perplexity=perplexity(step_loss), lr=lr,
                          grad_norm=grad_norm, tokens=int(global_tokens), input_tokens=int(global_inputs),
                          seq_len=int(micro_batches[0]["input_ids"].shape[-1]),
                          step_time_s=step_time, tokens_per_s=global_inputs / world / step_time,
                          model_flops=global_flops, tflops=tflops,
                          mfu=tflops / ctx.peak_tflops if tflops is not None and ctx.peak_tflops else None,
                          peak_mem_gb=round(peak_mem / GB, 1),
                          peak_reserved_gb=round((device_peak_reserved_bytes(ctx.device) or 0) / GB, 1) or None)
            if not first_step_reported:  # launch to the first step: loading, sharding, compile, data
                first_step_reported = True
                record["since_launch_s"] = round(seconds_since_launch(), 1)
            if distributed.is_main():
                if "since_launch_s" in record:  # tqdm.write: a line of its own under the progress bar
                    tqdm.write(f"--> first step done {record['since_launch_s']:.0f} s after launch (loading, "
                               "sharding, data and, on GPUs, torch.compile of the layers)")
                ctx.metrics.write("train_step", **record)
                if state.step % t.log_every_n_steps == 0:
                    pbar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.3f}")
                    tqdm.write(format_step_line(record, t.num_epochs))
            pbar.update(1)
            for obs in ctx.observers:
                obs.on_step_end(state, record)

            saved = None  # this step's checkpoint folder, when one is written
            if ctx.save_checkpoint and t.save_every_n_steps and state.step % t.save_every_n_steps == 0:
                saved = ctx.save_checkpoint(state, "step")
            if ctx.stop_request is not None:
                ctx.stop_request.after_step(state, ctx, saved)  # a stop signal: checkpoint, raise Preempted
            if t.max_train_step and state.step >= t.max_train_step:
                log(f"--> reached max_train_step={t.max_train_step}; stopping")
                stop = True
        pbar.close()

        # End of epoch: token-weighted epoch loss, LR decay, evaluation, checkpoint.
        train_loss = float(epoch_loss_sum / epoch_tokens.clamp(min=1))
        epoch_train_losses.append(train_loss)
        epoch_times.append(time.perf_counter() - epoch_start)
        epoch_done = state.batches_in_epoch >= len(train_loader)
        if epoch_done:  # an epoch cut short by max_train_step keeps its LR, so resuming it continues exactly
            lr_scheduler.step()
        eval_loss = None
        if eval_loader is not None and t.run_validation:
            with preserved_rng(ctx.device):  # a checkpoint taken after evaluation continues like the run
                eval_loss = evaluate(model, eval_loader, ctx, state)
            epoch_eval_losses.append(eval_loss)
        if epoch_done:
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            state.epoch_loss_sum, state.epoch_tokens = 0.0, 0.0
        improved = eval_loss is not None and eval_loss < state.best_eval_loss
        if improved:
            state.best_eval_loss = eval_loss
        epoch_memory = memory.epoch_stats()  # this epoch's peaks, evaluation included
        record = dict(epoch=epoch, step=state.step, train_loss=train_loss, train_perplexity=perplexity(train_loss),
                      epoch_time_s=epoch_times[-1], **epoch_memory.as_gb())
        if eval_loss is not None:
            record.update(eval_loss=eval_loss, eval_perplexity=perplexity(eval_loss))
        if distributed.is_main():
            ctx.metrics.write("epoch", **record)
        msg = f"Epoch {epoch + 1}: train_loss={train_loss:.4f} train_ppl={perplexity(train_loss):.2f}"
        if eval_loss is not None:
            msg += f" eval_loss={eval_loss:.4f} eval_ppl={perplexity(eval_loss):.2f}"
            msg += " (best)" if improved else ""
        log(msg + f" time={epoch_times[-1]:.1f}s")
        log(epoch_memory.format(f"epoch {epoch + 1}"))
        if ctx.save_checkpoint and t.save_model:
            ctx.save_checkpoint(state, "best" if improved or eval_loss is None else "epoch")

    summary = {
        "train_loss": epoch_train_losses[-1] if epoch_train_losses else None,
        "avg_train_loss": sum(epoch_train_losses) / len(epoch_train_losses) if epoch_train_losses else None,
        "avg_epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens_seen": state.tokens_seen,
    }
    run_memory = memory.run_stats()
    log(run_memory.format("whole run"))
    summary.update(run_memory.as_gb())
    if epoch_train_losses:
        summary["train_perplexity"] = perplexity(epoch_train_losses[-1])
    if epoch_eval_losses:
        summary.update(eval_loss=epoch_eval_losses[-1], eval_perplexity=perplexity(epoch_eval_losses[-1]),
                       best_eval_loss=state.best_eval_loss)
    return summary


@torch.no_grad()
def evaluate(model, eval_loader, ctx: TrainContext, state: TrainState) -> float:
    """Token-weighted mean loss over the evaluation set (all ranks); every sample is seen once."""
    t = ctx.run.train
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    tokens = torch.zeros((), dtype=torch.float64, device=ctx.device)
    total = min(len(eval_loader), t.max_eval_step) if t.max_eval_step else len(eval_loader)
    for i, batch in enumerate(tqdm(eval_loader, total=total, desc="Evaluating", dynamic_ncols=True,
                                   disable=not distributed.is_main())):
        if t.max_eval_step and i >= t.max_eval_step:
            break
        batch = to_device(batch, ctx.device)
        with ctx.autocast():
            out = model(**batch)
        loss_sum += out.loss_sum.double()
        tokens += out.num_tokens.double()
        if distributed.is_main():
            ctx.metrics.write("eval_step", step=state.step, batch=i, loss=float(out.loss_sum / out.num_tokens.clamp(min=1)))
    distributed.all_reduce_sum(loss_sum)
    distributed.all_reduce_sum(tokens)
    model.train()
    return float(loss_sum / tokens.clamp(min=1))
