"""Evaluation: the token-weighted mean loss over the evaluation set, over all ranks."""
from __future__ import annotations

import torch
from tqdm import tqdm

from shardtune.training.context import TrainContext
from shardtune.training.state import TrainState
from shardtune.training.step import to_device
from shardtune.utils import distributed


@torch.no_grad()
def evaluate(model, eval_loader, ctx: TrainContext, state: TrainState) -> float:
    """Token-weighted mean loss over the evaluation set (all ranks); every sample is seen once (at most
    --max_eval_step batches). Leaves the model in training mode."""
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
        with ctx.numerics.autocast():
            out = model(**batch)
        loss_sum += out.loss_sum.double()
        tokens += out.num_tokens.double()
        if distributed.is_main():
            ctx.telemetry.metrics.write("eval_step", step=state.step, batch=i,
                                        loss=float(out.loss_sum / out.num_tokens.clamp(min=1)))
    distributed.all_reduce_sum(loss_sum)
    distributed.all_reduce_sum(tokens)
    model.train()
    return float(loss_sum / tokens.clamp(min=1))
