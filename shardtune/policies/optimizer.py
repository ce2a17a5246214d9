"""The optimizer: AdamW (fused on CUDA) or the reference's AnyPrecisionAdamW, and the StepLR schedule."""
from __future__ import annotations

import torch

from shardtune.configs.run import RunConfigs
from shardtune.policies.anyprecision_optimizer import AnyPrecisionAdamW


def build_optimizer(model: torch.nn.Module, run: RunConfigs, device: torch.device):
    """AdamW (fused on CUDA) with no weight decay on biases and norm weights (1-D tensors), or the
    reference's AnyPrecisionAdamW."""
    t, f = run.train, run.fsdp
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if f.optimizer.lower() == "anyprecision":
        return AnyPrecisionAdamW(groups, lr=t.lr, momentum_dtype=torch.bfloat16, variance_dtype=torch.bfloat16,
                                 use_kahan_summation=f.use_kahan_summation)
    return torch.optim.AdamW(groups, lr=t.lr, fused=device.type == "cuda")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, run: RunConfigs):
    """StepLR as the reference: the learning rate is multiplied by ``gamma`` after every epoch."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=run.train.gamma)
