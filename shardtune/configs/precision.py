"""The precision mode of a run and everything it implies, in one place; the rest of the code asks here.

==============  =================  ====================  =====================  =============================
mode            stored parameters  compute               gradient reduction     extras
==============  =================  ====================  =====================  =============================
fp32            fp32               fp32                  fp32
bf16_mixed      fp32 (master)      bf16                  fp32                   autocast without FSDP
fp16_mixed      fp32 (master)      fp16                  fp32                   autocast; a gradient scaler
bf16_pure       bf16               bf16                  bf16                   parameters cast to bf16
==============  =================  ====================  =====================  =============================

Under FSDP the compute dtype is FSDP's MixedPrecisionPolicy (policies/mixed_precision.py builds it from
this table); in one process it is torch.autocast. The reference's FSDP1 policies reduced gradients in
bf16/fp16; here reduction stays in fp32 for the mixed modes: the sum over ranks is where low precision
hurts most. A checkpoint holds the stored parameters, so the converter rebuilds the model in
``checkpoint_mode`` to read it.
"""
from __future__ import annotations

from typing import Optional

import torch

MODES = ("fp32", "bf16_mixed", "fp16_mixed", "bf16_pure")

# mode -> (stored parameters and optimizer state, compute dtype or None for "as stored", gradient reduction)
_TABLE = {
    "fp32": (torch.float32, None, None),
    "bf16_mixed": (torch.float32, torch.bfloat16, torch.float32),
    "fp16_mixed": (torch.float32, torch.float16, torch.float32),
    "bf16_pure": (torch.bfloat16, None, None),
}


def resolve(run, device: torch.device, bf16_supported: Optional[bool] = None) -> str:
    """One precision mode for the whole run (train_config.precision; 'auto' decides from the reference's
    flags and the device: bf16_mixed on GPUs with bf16, fp32 on CPU). ``bf16_supported``: say so for a GPU that is
    not here (shardtune plan) instead of asking CUDA."""
    t, f = run.train, run.fsdp
    if t.precision != "auto":
        return t.precision
    if f.pure_bf16:
        return "bf16_pure"
    if t.use_fp16 or f.use_fp16:
        return "fp16_mixed"
    bf16_ok = device.type == "cuda" and (torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported)
    if t.mixed_precision and f.mixed_precision and bf16_ok:
        return "bf16_mixed"
    return "fp32"


def master_dtype(mode: str) -> torch.dtype:
    """The dtype trainable parameters are stored in (and the optimizer state with AdamW)."""
    return _TABLE[mode][0]


def compute_dtype(mode: str) -> Optional[torch.dtype]:
    """The dtype forward and backward run in; None: the stored dtype."""
    return _TABLE[mode][1]


def reduce_dtype(mode: str) -> Optional[torch.dtype]:
    """The dtype gradients are summed over ranks in; None: the stored dtype."""
    return _TABLE[mode][2]


def frozen_dtype(mode: str) -> torch.dtype:
    """The dtype a weight that never gets an update is stored in: the compute dtype (no master copy needed)."""
    return compute_dtype(mode) or master_dtype(mode)


def checkpoint_mode(mode: str) -> str:
    """The mode to rebuild a model in to read a checkpoint: its parameters are the stored ones (bf16 for
    bf16_pure, fp32 for every other mode)."""
    return "bf16_pure" if mode == "bf16_pure" else "fp32"


__all__ = ["MODES", "resolve", "master_dtype", "compute_dtype", "reduce_dtype", "frozen_dtype", "checkpoint_mode"]
