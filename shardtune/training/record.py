"""What a step and an epoch leave behind: the metrics records (rank 0 writes them) and the log lines.

Throughput is per GPU (process): all input tokens, padding included, and analytic TFLOP/s; MFU against the
accelerator's peak. Peak memory: device allocated on GPUs, host RSS on CPU. The record fields are listed in
observability/metrics.py.
"""
from __future__ import annotations

from typing import List, Optional

from tqdm import tqdm

from shardtune.observability.memory import (GB, MemoryStats, MemoryTracker, device_peak_allocated_bytes,
                                            device_peak_reserved_bytes, host_peak_rss_bytes)
from shardtune.observability.metrics import format_step_line, perplexity, seconds_since_launch
from shardtune.training.context import TrainContext
from shardtune.training.state import TrainState
from shardtune.training.step import StepResult
from shardtune.utils import distributed
from shardtune.utils.logging import log


class StepRecorder:
    """Builds each applied step's ``train_step`` record, writes it and prints its line (rank 0)."""

    def __init__(self, ctx: TrainContext, memory: MemoryTracker):
        self.ctx, self.memory = ctx, memory
        self.first_step_reported = False  # launch to the first step: loading, sharding, compile, data

    def record(self, state: TrainState, result: StepResult, seq_len: int, step_time: float, lr: float,
               progress: tqdm) -> dict:
        telemetry, device, t = self.ctx.telemetry, self.ctx.device, self.ctx.run.train
        world = distributed.info().world_size
        tokens = result.tokens
        tflops = tokens.flops / world / step_time / 1e12 if telemetry.model_flops else None
        peak_mem = device_peak_allocated_bytes(device) or host_peak_rss_bytes()
        self.memory.sample()  # the host's per-epoch peak when the epoch stays under the process' high-water mark
        record = dict(step=state.step, epoch=state.epoch, loss=result.loss, perplexity=perplexity(result.loss), lr=lr,
                      grad_norm=result.grad_norm, tokens=int(tokens.supervised), input_tokens=int(tokens.inputs),
                      seq_len=seq_len, step_time_s=step_time, tokens_per_s=tokens.inputs / world / step_time,
                      model_flops=tokens.flops, tflops=tflops,
                      mfu=tflops / telemetry.peak_tflops if tflops is not None and telemetry.peak_tflops else None,
                      peak_mem_gb=round(peak_mem / GB, 1),
                      peak_reserved_gb=round((device_peak_reserved_bytes(device) or 0) / GB, 1) or None)
        if not self.first_step_reported:
            self.first_step_reported = True
            record["since_launch_s"] = round(seconds_since_launch(), 1)
        if distributed.is_main():
            if "since_launch_s" in record:  # tqdm.write: a line of its own under the progress bar
                compiled = telemetry.phases.compiled_in("first_step")
                tqdm.write(f"--> first step done {record['since_launch_s']:.0f} s after launch (loading, sharding, "
                           "data" + (f"; compiled in {compiled:.0f} s" if compiled else "") + ")")
            telemetry.metrics.write("train_step", **record)
            if state.step % t.log_every_n_steps == 0:
                progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{result.grad_norm:.3f}")
                tqdm.write(format_step_line(record, t.num_epochs))
        return record


def record_epoch(ctx: TrainContext, state: TrainState, epoch: int, train_loss: float, eval_loss: Optional[float],
                 improved: bool, epoch_time: float, epoch_memory: MemoryStats) -> None:
    """The ``epoch`` record (rank 0) and the epoch's log lines."""
    record = dict(epoch=epoch, step=state.step, train_loss=train_loss, train_perplexity=perplexity(train_loss),
                  epoch_time_s=epoch_time, **epoch_memory.as_gb())
    if eval_loss is not None:
        record.update(eval_loss=eval_loss, eval_perplexity=perplexity(eval_loss))
    if distributed.is_main():
        ctx.telemetry.metrics.write("epoch", **record)
    msg = f"Epoch {epoch + 1}: train_loss={train_loss:.4f} train_ppl={perplexity(train_loss):.2f}"
    if eval_loss is not None:
        msg += f" eval_loss={eval_loss:.4f} eval_ppl={perplexity(eval_loss):.2f}"
        msg += " (best)" if improved else ""
    log(msg + f" time={epoch_time:.1f}s")
    log(epoch_memory.format(f"epoch {epoch + 1}"))


def run_summary(state: TrainState, train_losses: List[float], eval_losses: List[float], epoch_times: List[float],
                memory: MemoryTracker) -> dict:
    """What ``train`` returns (and main writes to summary.json): losses, perplexities, steps, timings, memory."""
    summary = {
        "train_loss": train_losses[-1] if train_losses else None,
        "avg_train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
        "avg_epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens_seen": state.tokens_seen,
    }
    run_memory = memory.run_stats()
    log(run_memory.format("whole run"))
    summary.update(run_memory.as_gb())
    if train_losses:
        summary["train_perplexity"] = perplexity(train_losses[-1])
    if eval_losses:
        summary.update(eval_loss=eval_losses[-1], eval_perplexity=perplexity(eval_losses[-1]),
                       best_eval_loss=state.best_eval_loss)
    return summary
