"""Evaluation: the token-weighted mean loss over the evaluation set, over all ranks.

Made to run at the device's pace, compiled or not:
* no host-device synchronisation per batch: the per-batch losses stay on the device and are read once, at the
  end (for the ``eval_step`` records), together with the totals;
* every batch has the same number of rows: the last, partial batch is topped up with copies of its first row whose
  labels are all ignored (0 loss, 0 tokens: the loss stays token-weighted and complete). Under torch.compile a
  smaller batch would be a new shape, hence a recompilation in the middle of every evaluation; this way the
  no_grad graph that the first evaluation compiles (training's graph records gradients: another one) serves every
  later evaluation.
"""
from __future__ import annotations

from typing import Dict

import torch
from tqdm import tqdm

from shardtune.models.loss import IGNORE_INDEX
from shardtune.training.context import TrainContext
from shardtune.training.state import TrainState
from shardtune.training.step import to_device
from shardtune.utils import distributed


def full_rows(batch: Dict[str, torch.Tensor], rows: int) -> Dict[str, torch.Tensor]:
    """``batch`` with ``rows`` rows: missing rows are copies of row 0 with no supervised token."""
    missing = rows - batch["input_ids"].shape[0] if rows else 0
    if missing <= 0 or not all(torch.is_tensor(v) and v.dim() and len(v) == len(batch["input_ids"])
                               for v in batch.values()):  # a custom collator's batch of another layout: as it is
        return batch
    out = {k: torch.cat([v, v[:1].expand(missing, *v.shape[1:])]) for k, v in batch.items()}
    out["labels"][-missing:] = IGNORE_INDEX
    return out


@torch.no_grad()
def evaluate(model, eval_loader, ctx: TrainContext, state: TrainState) -> float:
    """Token-weighted mean loss over the evaluation set (all ranks); every sample is seen once (at most
    --max_eval_step batches). Leaves the model in training mode."""
    t = ctx.run.train
    model.eval()
    total = min(len(eval_loader), t.max_eval_step) if t.max_eval_step else len(eval_loader)
    # per batch: (summed loss, supervised tokens), float64 on the device
    sums = torch.zeros((total, 2), dtype=torch.float64, device=ctx.device)
    rows = getattr(eval_loader.batch_sampler, "batch_size", None)
    for i, batch in enumerate(tqdm(eval_loader, total=total, desc="Evaluating", dynamic_ncols=True,
                                   disable=not distributed.is_main())):
        if i >= total:
            break
        batch = to_device(full_rows(batch, rows), ctx.device)
        with ctx.numerics.autocast():
            out = model(**batch)
        sums[i, 0] = out.loss_sum.detach()
        sums[i, 1] = out.num_tokens
    totals = distributed.all_reduce_sum(sums.sum(dim=0))
    model.train()
    per_batch = sums.tolist()  # the one read of the device
    if distributed.is_main():
        for i, (loss_sum, tokens) in enumerate(per_batch):
            ctx.telemetry.metrics.write("eval_step", step=state.step, batch=i, loss=loss_sum / max(tokens, 1.0))
    loss_sum, tokens = totals.tolist()
    return loss_sum / max(tokens, 1.0)
