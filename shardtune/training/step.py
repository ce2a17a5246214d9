"""One optimizer step: count the step's tokens, accumulate the gradients of its micro-batches, measure and clip the
gradient norm, then apply the update or skip it.

Loss convention: every optimizer step minimises the mean cross-entropy over *all* supervised tokens of that step
(every micro-batch, every rank). Each micro-batch's summed loss is divided by the step's global token count before
backward, so ``batch_size_training=2, gradient_accumulation_steps=4`` gives the same loss and gradients as
``8 x 1``, and 2 ranks with batch b equal 1 rank with batch 2b.

The step reads the device once (``.tolist()`` of the loss and the gradient norm together): the skip decision needs
both numbers on the host, and nothing else in the step waits for the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

from shardtune.configs.training import train_config
from shardtune.errors import TrainingDiverged
from shardtune.models.loss import count_supervised_tokens
from shardtune.observability.flops import ModelFlops
from shardtune.training.context import TrainContext
from shardtune.training.state import TrainState
from shardtune.utils import distributed
from shardtune.utils.logging import log


@dataclass
class StepTokens:
    """A step's counts over all its micro-batches and all ranks, summed in host memory before any backward."""

    supervised: float  # tokens with a label: the loss's denominator
    inputs: float      # all input tokens, padding included: throughput
    flops: float       # analytic model FLOPs (0 without a ModelFlops)


@dataclass
class StepResult:
    """A measured step. Every number is global (all ranks), so every rank takes the same decision on it."""

    tokens: StepTokens
    loss_sum: float   # summed cross-entropy of the step
    loss: float       # loss_sum / supervised tokens
    grad_norm: float  # before clipping
    applied: bool     # False: not finite, skipped


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def take_micro_batches(batches: Iterator, n: int) -> list:
    """The next ``n`` micro-batches (fewer at the end of the epoch; none when it is over)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(batches))
        except StopIteration:
            break
    return out


def clip_threshold(t: train_config) -> Optional[float]:
    return t.gradient_clipping_threshold if t.gradient_clipping and t.gradient_clipping_threshold > 0 else None


def count_step_tokens(micro_batches: List[dict], model_flops: Optional[ModelFlops]) -> StepTokens:
    """One all-reduce of three host numbers; the GPU goes on with the previous step meanwhile."""
    local_tokens = sum(int(count_supervised_tokens(b["labels"])) for b in micro_batches)
    local_inputs = sum(b["input_ids"].numel() for b in micro_batches)
    local_flops = sum(model_flops.batch(b["input_ids"].shape) for b in micro_batches) if model_flops else 0.0
    return StepTokens(*distributed.sum_on_host([local_tokens, local_inputs, local_flops]))


def accumulate_gradients(model: torch.nn.Module, micro_batches: List[dict], tokens: StepTokens,
                         ctx: TrainContext) -> torch.Tensor:
    """Forward and backward every micro-batch; gradients are reduced over ranks only on the last one. Returns this
    rank's summed loss as a 0-d tensor on the device (not read yet)."""
    numerics = ctx.numerics
    # FSDP averages gradients over ranks; multiplying by the world size cancels that, so the gradient is that of
    # sum(loss) / global supervised tokens exactly.
    scale = distributed.info().world_size / max(tokens.supervised, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for i, batch in enumerate(micro_batches):
        numerics.set_gradient_sync(model, i == len(micro_batches) - 1)
        batch = to_device(batch, ctx.device)
        with numerics.autocast():
            out = model(**batch)
        loss = out.loss_sum * scale
        if numerics.scaler is not None:
            numerics.scaler.scale(loss).backward()
        else:
            loss.backward()
        loss_sum += out.loss_sum.detach()
    return loss_sum


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


def measure(model: torch.nn.Module, optimizer, local_loss_sum: torch.Tensor, tokens: StepTokens,
            ctx: TrainContext) -> StepResult:
    """Unscale (fp16), measure and clip the gradient norm; sum the loss over ranks; read both (the one sync)."""
    if ctx.numerics.scaler is not None:
        ctx.numerics.scaler.unscale_(optimizer)
    grad_norm = clip_and_measure_grad_norm(model, clip_threshold(ctx.run.train), ctx.device)
    global_loss_sum = distributed.all_reduce_sum(local_loss_sum.double())
    grad_norm, global_loss_sum = torch.stack([grad_norm.to(global_loss_sum), global_loss_sum]).tolist()
    loss = global_loss_sum / max(tokens.supervised, 1.0)
    # The fp16 scaler skips steps with overflowing gradients itself; its norm is then inf by design.
    finite = math.isfinite(loss) and (ctx.numerics.scaler is not None or math.isfinite(grad_norm))
    return StepResult(tokens, global_loss_sum, loss, grad_norm, applied=finite)


def apply_update(optimizer, scaler: Optional[torch.amp.GradScaler]) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def skip_update(optimizer, scaler: Optional[torch.amp.GradScaler], result: StepResult, state: TrainState,
                t: train_config) -> None:
    """A step whose loss or gradient norm is not finite is never applied; past --max_nonfinite_steps the run stops."""
    state.skipped_steps += 1
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    what = f"step {state.step + 1}: loss {result.loss:.4g}, gradient norm {result.grad_norm:.4g}"
    if state.skipped_steps > t.max_nonfinite_steps:
        raise TrainingDiverged(f"training diverged at {what} (not finite); stopped without saving it "
                               f"(lower --lr, add --gradient_clipping, or skip such steps with "
                               f"--max_nonfinite_steps N)")
    log(f"--> {what} not finite: step skipped ({state.skipped_steps} of at most "
        f"{t.max_nonfinite_steps} allowed by --max_nonfinite_steps)")


def optimizer_step(model: torch.nn.Module, micro_batches: List[dict], optimizer, ctx: TrainContext,
                   state: TrainState) -> StepResult:
    """Accumulate, measure, then apply or skip; updates the progress in ``state``."""
    tokens = count_step_tokens(micro_batches, ctx.telemetry.model_flops)
    result = measure(model, optimizer, accumulate_gradients(model, micro_batches, tokens, ctx), tokens, ctx)
    state.batches_in_epoch += len(micro_batches)  # the data position (samples_in_epoch) follows: training/loop.py
    state.tokens_in_epoch += int(tokens.supervised)
    if not result.applied:
        skip_update(optimizer, ctx.numerics.scaler, result, state, ctx.run.train)
        return result
    apply_update(optimizer, ctx.numerics.scaler)
    state.step += 1
    state.tokens_seen += int(tokens.supervised)
    state.epoch_loss_sum += result.loss_sum
    state.epoch_tokens += tokens.supervised
    return result
