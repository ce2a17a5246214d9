"""AnyPrecisionAdamW: AdamW whose moment estimates are kept in a chosen (usually low) precision.

Use it with ``bf16_pure`` training (bf16 parameters, no fp32 master copy): together they need
2 + 2 + 2 bytes per parameter for weights and moments instead of 4 + 4 + 4 (fp32 AdamW) or
4 + 4 + 4 + 2 (mixed precision with a bf16 compute copy).

The update is AdamW's (decoupled weight decay, bias-corrected moments). Every step is computed in
fp32 from the stored moments and rounded once when written back, so low-precision storage loses
bits only in storage, not through a chain of low-precision arithmetic.

Kahan summation (``use_kahan_summation=True``): adding a small update to a bf16 weight often rounds
to no change at all (bf16 has 8 mantissa bits, so updates below ~1/256 of the weight vanish). A
per-parameter compensation buffer keeps what rounding dropped and adds it back on the next step, so
the weights follow the fp32 trajectory much more closely at the cost of one more buffer.

Works with plain tensors and with FSDP2's sharded DTensor parameters (every operation is elementwise,
so each rank updates its own shard).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Tuple

import torch
from torch.optim import Optimizer


class AnyPrecisionAdamW(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, use_kahan_summation: bool = False,
                 momentum_dtype: torch.dtype = torch.bfloat16, variance_dtype: torch.dtype = torch.bfloat16,
                 compensation_buffer_dtype: torch.dtype = torch.bfloat16):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        use_kahan_summation=use_kahan_summation, momentum_dtype=momentum_dtype,
                        variance_dtype=variance_dtype, compensation_buffer_dtype=compensation_buffer_dtype)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        # "step" is a tensor so that distributed state dicts treat it like torch's own AdamW does.
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, dtype=group["momentum_dtype"], memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["variance_dtype"],
                                               memory_format=torch.preserve_format)
        if group["use_kahan_summation"]:
            state["compensation"] = torch.zeros_like(p, dtype=group["compensation_buffer_dtype"],
                                                     memory_format=torch.preserve_format)
        return state

    _STATE_DTYPES = (("exp_avg", "momentum_dtype"), ("exp_avg_sq", "variance_dtype"),
                     ("compensation", "compensation_buffer_dtype"))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating-point state to each parameter's dtype; the moments and the
        compensation buffer keep their configured dtypes here (fp32 moments of bf16 weights stay fp32)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                pid = saved_ids.pop(0)
                for key, dtype_key in self._STATE_DTYPES:
                    if pid in saved and key in saved[pid]:
                        self.state[p][key] = saved[pid][key].to(device=p.device, dtype=group[dtype_key])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AnyPrecisionAdamW does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state = self._init_state(p, group)
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad.float()

                # Moments: exponential moving averages of the gradient and its square, computed in fp32
                # and stored in their own dtype.
                exp_avg = state["exp_avg"].float() * beta1 + grad * (1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float() * beta2 + grad * grad * (1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)

                # The AdamW update, in fp32: decoupled weight decay plus the bias-corrected Adam step.
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                denom = exp_avg_sq.sqrt_().div_(math.sqrt(bias_correction2)).add_(eps)  # fp32 temporaries
                update = exp_avg.div_(denom).mul_(-lr / bias_correction1)
                weights = p.float()
                if weight_decay:
                    weights = weights * (1 - lr * weight_decay)

                if group["use_kahan_summation"]:
                    # Add the update plus what rounding dropped last time; keep what is dropped now.
                    compensation = state["compensation"]
                    exact = weights + update.add_(compensation.float())
                    p.copy_(exact)                              # rounds once, to p's dtype
                    compensation.copy_(exact.sub_(p.float()))   # the part rounding dropped
                else:
                    p.copy_(weights.add_(update))
        return loss
