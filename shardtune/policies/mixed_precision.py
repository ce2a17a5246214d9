"""What the precision mode (configs/precision.py owns the table) does to the model and the step: the FSDP2
MixedPrecisionPolicy applied when FSDP all-gathers and reduces, the bf16_pure cast, autocast without FSDP and the
fp16 gradient scaler."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from shardtune.configs import precision as P
from shardtune.models.quantization import is_quantized


def mp_policy_for(mode: str) -> MixedPrecisionPolicy:
    """The MixedPrecisionPolicy for a precision mode (fp32 and bf16_pure: parameters are used as stored)."""
    if mode not in P.MODES:
        raise ValueError(f"unknown precision {mode!r}; expected one of {', '.join(P.MODES)}")
    return MixedPrecisionPolicy(param_dtype=P.compute_dtype(mode), reduce_dtype=P.reduce_dtype(mode))


def describe(mode: str) -> str:
    p = mp_policy_for(mode)
    name = lambda d: str(d).removeprefix("torch.") if d is not None else "as stored"  # noqa: E731
    return f"params {name(p.param_dtype)}, gradient reduction {name(p.reduce_dtype)}"


def cast_parameters(model: torch.nn.Module, mode: str) -> None:
    """bf16_pure: floating-point parameters (not buffers: RoPE frequencies stay fp32) become bf16. Other
    modes keep the dtype the model was loaded in. Quantized weights are never cast (their dtype is a view of
    packed bytes: models/quantization.py)."""
    if mode != "bf16_pure":
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16 and not is_quantized(p):
            p.data = p.data.to(torch.bfloat16)



def autocast(mode: str, device: torch.device, sharded: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for forward passes: autocast for the mixed modes without FSDP (FSDP casts
    parameters itself through its MixedPrecisionPolicy); a no-op otherwise."""
    dtype = P.compute_dtype(mode)
    if sharded or dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)



def grad_scaler(mode: str, device: torch.device):
    """fp16 needs its loss scaled (gradients would underflow); no other mode does. Under FSDP2 the plain
    GradScaler works on the sharded DTensor gradients."""
    return torch.amp.GradScaler(device.type) if mode == "fp16_mixed" else None
