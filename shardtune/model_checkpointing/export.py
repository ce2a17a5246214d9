"""Exporting the trained model in formats plain Hugging Face code loads, and checking what was written.

* PEFT runs: a PEFT adapter folder (``PeftModel.from_pretrained(base, folder)``).
* Full fine-tuning: a Hugging Face folder (safetensors + config + tokenizer) that
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads, in the checkpoint's original dtype.

Both take a *gathered* state dict (FSDP runs gather it on rank 0) whose keys are canonical: the names
``lm.state_dict()`` would give, without the segments that wrappers add to module names
(``_checkpoint_wrapped_module.`` from activation checkpointing, ``_orig_mod.`` from ``torch.compile``).

Every export is checked right after it is written and before it replaces the previous one: the files
are read back and must hold every trained tensor. A mismatch raises :class:`SaveError` naming what is
missing; the previous export stays in place. Folders are written under a temporary name and renamed
into place when complete.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from shardtune.errors import SaveError
from shardtune.utils.io import atomic_directory

ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_INFO = "shardtune_export.json"  # which run and step an export holds (resume finishes a cut-off export)

# Segments that module wrappers insert into module names but not into state-dict keys.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _describe(keys: Iterable[str], limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def is_peft_model(lm) -> bool:
    return hasattr(lm, "peft_config")


def export_pretrained(lm, tokenizer, out_dir: Path, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                      dtype: Optional[torch.dtype] = None, info: Optional[dict] = None) -> Path:
    """Export ``lm`` (a transformers model or a PeftModel): an adapter folder or a full model folder.

    state_dict: the gathered state dict (FSDP runs: trainable parameters for PEFT, everything for full
    fine-tuning); default: taken from ``lm`` itself. dtype: full models only (see export_model).
    """
    if is_peft_model(lm):
        if state_dict is None:
            state_dict = {canonical_name(n): p for n, p in lm.named_parameters() if p.requires_grad}
        return export_adapter(lm, state_dict, out_dir, tokenizer, info)
    if state_dict is None:
        state_dict = lm.state_dict()
    return export_model(lm, state_dict, out_dir, tokenizer, dtype, info)


# ---------------------------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------------------------
def adapter_tensors(peft_model, trainable: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter file, keyed as ``PeftModel.from_pretrained`` expects them.

    trainable: the gathered trainable parameters, canonical keys relative to the PeftModel.
    """
    from peft.utils import get_peft_model_state_dict

    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if config.is_prompt_learning:
        # peft would read the prompt encoder's weight from the (sharded) module itself; ours is gathered.
        return {"prompt_embeddings": trainable[f"prompt_encoder.{name}.embedding.weight"]}
    # peft picks the adapter's entries by module names, which wrappers change while state-dict keys keep
    # the plain names (this mismatch once exported an empty adapter under activation checkpointing). Hand
    # peft the keys under the names its modules have, then drop the wrapper segments again.
    module_names = {canonical_name(n): n for n, _ in peft_model.named_parameters()}
    as_modules_see_them = {module_names.get(k, k): v for k, v in trainable.items()}
    selected = get_peft_model_state_dict(peft_model, state_dict=as_modules_see_them, adapter_name=name,
                                         save_embedding_layers=False)
    return {canonical_name(k): v for k, v in selected.items()}


def export_adapter(peft_model, trainable: Dict[str, torch.Tensor], out_dir: Path, tokenizer=None,
                   info: Optional[dict] = None) -> Path:
    """Write a PEFT adapter folder from the gathered trainable parameters, then check it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_tensors(peft_model, trainable).items()}
    with atomic_directory(out_dir) as tmp:
        config = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        check_adapter(tmp, tensors, n_trainable=len(trainable))
        _write_info(tmp, info)
    return Path(out_dir)


def check_adapter(folder: Path, expected: Dict[str, torch.Tensor], n_trainable: int) -> None:
    """The adapter file holds one tensor per trainable tensor, with the trained values."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_WEIGHTS
    with safe_open(str(path), framework="pt") as fh:
        saved = set(fh.keys())
        if len(saved) != n_trainable or saved != set(expected):
            raise SaveError(f"adapter {path} holds {len(saved)} tensors but {n_trainable} were trained "
                            f"(missing: {_describe(set(expected) - saved) or 'none'}); the trained adapter was "
                            f"NOT saved")
        for key in saved:
            if not torch.equal(fh.get_tensor(key), expected[key]):
                raise SaveError(f"adapter {path}: tensor {key} differs from the trained one after writing")


# ---------------------------------------------------------------------------------------------
# Full models
# ---------------------------------------------------------------------------------------------
def export_model(lm, state_dict: Dict[str, torch.Tensor], out_dir: Path, tokenizer=None,
                 dtype: Optional[torch.dtype] = None, info: Optional[dict] = None) -> Path:
    """Write a Hugging Face folder from a full (gathered) state dict, then check it.

    dtype: cast floating-point tensors to this dtype (the dtype the base checkpoint was stored in);
    config.json states the dtype the weights are written in.
    """
    sd = state_dict
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    train_dtype = getattr(lm.config, "dtype", None)
    with atomic_directory(out_dir) as tmp:
        if dtype is not None:
            lm.config.dtype = dtype
        try:
            lm.save_pretrained(tmp, state_dict=sd)
        finally:
            lm.config.dtype = train_dtype
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        check_model_folder(tmp, sd, tied=set(getattr(lm, "all_tied_weights_keys", None) or {}))
        _write_info(tmp, info)
    return Path(out_dir)


def saved_tensor_shapes(folder: Path) -> Dict[str, tuple]:
    """Names and shapes of every tensor in a folder's safetensors files (headers only, no data read)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def check_model_folder(folder: Path, state_dict: Dict[str, torch.Tensor], tied: set = frozenset()) -> None:
    """Every tensor of the state dict is in the folder with its shape (tied copies may be left out)."""
    saved = saved_tensor_shapes(folder)
    missing = set(state_dict) - set(saved) - set(tied)
    wrong = [k for k in set(state_dict) & set(saved) if saved[k] != tuple(state_dict[k].shape)]
    if missing or wrong:
        raise SaveError(f"model {folder} holds {len(saved)} of {len(state_dict)} tensors (missing: "
                        f"{_describe(missing) or 'none'}; wrong shape: {_describe(wrong) or 'none'}); the trained "
                        f"model was NOT saved")


# ---------------------------------------------------------------------------------------------
# Which run and step an export holds
# ---------------------------------------------------------------------------------------------
def _write_info(folder: Path, info: Optional[dict]) -> None:
    if info is not None:
        (Path(folder) / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_export_info(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
