"""FSDP2 mixed-precision policies, one per precision mode (``utils/config_utils.resolve_precision``).

==============  ===================  ====================  ================================================
mode            stored parameters     compute (all-gather)  gradient reduction
==============  ===================  ====================  ================================================
fp32            fp32                  fp32                  fp32
bf16_mixed      fp32 (master)         bf16                  fp32
fp16_mixed      fp32 (master)         fp16                  fp32; the loss is scaled (a gradient scaler)
bf16_pure       bf16                  bf16                  bf16 (optimizer state bf16 with anyprecision)
==============  ===================  ====================  ================================================

The reference's FSDP1 policies reduced gradients in bf16/fp16 (``bfSixteen``, ``fpSixteen``); here
reduction stays in fp32 for the mixed modes: the sum over ranks is where low precision hurts most.
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

FP32 = MixedPrecisionPolicy()
BF16_MIXED = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
FP16_MIXED = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
BF16_PURE = MixedPrecisionPolicy()  # parameters are bf16 already; nothing to cast

POLICIES = {"fp32": FP32, "bf16_mixed": BF16_MIXED, "fp16_mixed": FP16_MIXED, "bf16_pure": BF16_PURE}


def mp_policy_for(precision: str) -> MixedPrecisionPolicy:
    """The MixedPrecisionPolicy for a precision mode."""
    try:
        return POLICIES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(POLICIES)}") from None


def describe(precision: str) -> str:
    p = mp_policy_for(precision)
    name = lambda d: str(d).removeprefix("torch.") if d is not None else "as stored"  # noqa: E731
    return f"params {name(p.param_dtype)}, gradient reduction {name(p.reduce_dtype)}"
