"""FSDP2 mixed-precision policies: the precision mode's compute and reduction dtypes (utils/precision.py
owns the table) as the MixedPrecisionPolicy that FSDP applies when it all-gathers and reduces."""
from __future__ import annotations

from torch.distributed.fsdp import MixedPrecisionPolicy

from shardtune.utils import precision as P


def mp_policy_for(mode: str) -> MixedPrecisionPolicy:
    """The MixedPrecisionPolicy for a precision mode (fp32 and bf16_pure: parameters are used as stored)."""
    if mode not in P.MODES:
        raise ValueError(f"unknown precision {mode!r}; expected one of {', '.join(P.MODES)}")
    return MixedPrecisionPolicy(param_dtype=P.compute_dtype(mode), reduce_dtype=P.reduce_dtype(mode))


def describe(mode: str) -> str:
    p = mp_policy_for(mode)
    name = lambda d: str(d).removeprefix("torch.") if d is not None else "as stored"  # noqa: E731
    return f"params {name(p.param_dtype)}, gradient reduction {name(p.reduce_dtype)}"
