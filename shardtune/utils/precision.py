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

import contextlib
from typing import Callable, Optional

import torch

MODES = ("fp32", "bf16_mixed", "fp16_mixed", "bf16_pure")

# mode -> (stored parameters and optimizer state, compute dtype or None for "as stored", gradient reduction)
_TABLE = {
    "fp32": (torch.float32, None, None),
    "bf16_mixed": (torch.float32, torch.bfloat16, torch.float32),
    "fp16_mixed": (torch.float32, torch.float16, torch.float32),
    "bf16_pure": (torch.bfloat16, None, None),
}


def resolve(run, device: torch.device) -> str:
    """One precision mode for the whole run (train_config.precision; 'auto' decides from the reference's
    flags and the device: bf16_mixed on GPUs with bf16, fp32 on CPU)."""
    t, f = run.train, run.fsdp
    if t.precision != "auto":
        return t.precision
    if f.pure_bf16:
        return "bf16_pure"
    if t.use_fp16 or f.use_fp16:
        return "fp16_mixed"
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
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


def cast_parameters(model: torch.nn.Module, mode: str) -> None:
    """bf16_pure: floating-point parameters (not buffers: RoPE frequencies stay fp32) become bf16. Other
    modes keep the dtype the model was loaded in. Quantized weights are never cast (their dtype is a view of
    packed bytes: policies/quantization.py)."""
    from shardtune.policies.quantization import is_quantized

    if mode != "bf16_pure":
        return
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16 and not is_quantized(p):
            p.data = p.data.to(torch.bfloat16)


def autocast(mode: str, device: torch.device, sharded: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for forward passes: autocast for the mixed modes without FSDP (FSDP casts
    parameters itself through its MixedPrecisionPolicy); a no-op otherwise."""
    dtype = compute_dtype(mode)
    if sharded or dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler(mode: str, device: torch.device):
    """fp16 needs its loss scaled (gradients would underflow); no other mode does. Under FSDP2 the plain
    GradScaler works on the sharded DTensor gradients."""
    return torch.amp.GradScaler(device.type) if mode == "fp16_mixed" else None


__all__ = ["MODES", "resolve", "master_dtype", "compute_dtype", "reduce_dtype", "frozen_dtype", "checkpoint_mode",
           "cast_parameters", "autocast", "grad_scaler"]
