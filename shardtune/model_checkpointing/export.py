"""Exporting the trained model in formats plain Hugging Face code loads.

* PEFT runs: a PEFT adapter folder (``PeftModel.from_pretrained(base, folder)``).
* Full fine-tuning: a Hugging Face folder (safetensors + config + tokenizer) that
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads, in the checkpoint's original dtype.

Only rank 0 writes, into a temporary folder that is renamed into place when complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from shardtune.utils.io import atomic_directory


def export_pretrained(lm, tokenizer, out_dir: Path, state_dict: Optional[dict] = None,
                      dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``lm`` (a transformers model or PeftModel) with ``save_pretrained``.

    state_dict: a full (gathered) state dict to write instead of ``lm.state_dict()`` (FSDP runs).
    dtype: cast floating-point tensors to this dtype (the dtype the base checkpoint was stored in).
    """
    is_peft = hasattr(lm, "peft_config")
    with atomic_directory(out_dir) as tmp:
        if is_peft:
            kwargs = {"state_dict": state_dict} if state_dict is not None else {}
            lm.save_pretrained(tmp, **kwargs)
        else:
            sd = state_dict if state_dict is not None else lm.state_dict()
            train_dtype = getattr(lm.config, "dtype", None)
            if dtype is not None:
                sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                lm.config.dtype = dtype  # config.json states the dtype the weights are written in
            try:
                lm.save_pretrained(tmp, state_dict=sd)
            finally:
                lm.config.dtype = train_dtype
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
