"""Exporting the trained model in formats plain Hugging Face code loads, and checking what was written.

* PEFT runs: a PEFT adapter folder (``PeftModel.from_pretrained(base, folder)``).
* Full fine-tuning: a Hugging Face folder (safetensors shards + index, config, tokenizer) that
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads, in the checkpoint's original dtype.

Both take the model's *live* tensors (FSDP2: the DTensor shards; one process: the parameters themselves) keyed
canonically: the names ``lm.state_dict()`` would give, without the segments that wrappers add to module names
(``_checkpoint_wrapped_module.`` from activation checkpointing, ``_orig_mod.`` from ``torch.compile``). Nothing
is gathered as a whole: streaming.py gathers, casts and writes one shard at a time, so exporting adds about one
shard of host memory, not the model. Exports are collective (every rank calls them); rank 0 writes.

Every export is checked as it is written and before it replaces the previous one: each shard is read back
tensor by tensor and must equal what was gathered, and the folder must hold every trained tensor. A mismatch
raises :class:`SaveError` naming what is missing; the previous export stays in place. Folders are written under
a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import copy
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from shardtune.errors import SaveError
from shardtune.model_checkpointing.streaming import (MAX_SHARD_SIZE, ONE_FILE, Convert, Written, read_headers,
                                                  write_tensors)
from shardtune.utils import distributed
from shardtune.utils.io import atomic_directory
from shardtune.utils.logging import log

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
                      dtype: Optional[torch.dtype] = None, info: Optional[dict] = None,
                      max_shard_size=MAX_SHARD_SIZE) -> Path:
    """Export ``lm`` (a transformers model or a PeftModel): an adapter folder or a full model folder. Collective.

    state_dict: the tensors to write, canonical keys, live (DTensors are gathered one at a time): the trainable
    parameters for PEFT, every weight for full fine-tuning; default: taken from ``lm`` itself. dtype: full
    models only (see export_model).
    """
    if is_peft_model(lm):
        if state_dict is None:
            state_dict = {canonical_name(n): p for n, p in lm.named_parameters() if p.requires_grad}
        return export_adapter(lm, state_dict, out_dir, tokenizer, info)
    if state_dict is None:
        state_dict = lm.state_dict(keep_vars=True)  # the parameters themselves: nothing copied
    return export_model(lm, state_dict, out_dir, tokenizer, dtype, info, max_shard_size)


def _export_folder(out_dir: Path, what: str, info: Optional[dict], write: Callable[[Optional[Path]], Written]) -> Path:
    """Rank 0's temporary folder, filled by ``write(tmp)`` on every rank (collective), renamed into place; one line
    says what was written. A failure on any rank leaves the previous ``out_dir`` as it was."""
    start = time.perf_counter()
    with contextlib.ExitStack() as on_rank0_only:
        tmp = distributed.on_rank0(lambda: on_rank0_only.enter_context(atomic_directory(out_dir)),
                                   f"prepare the {what} folder")
        written = write(tmp)
        distributed.on_rank0(lambda: _write_info(tmp, info), f"write the {what}")
        distributed.on_rank0(on_rank0_only.close, f"put the {what} in place")  # the rename, errors shared
    step = f" (step {info['step']})" if info and "step" in info else ""
    shards = sum(f.endswith(".safetensors") for f in written.files)
    log(f"--> saved {what}{step} to {out_dir}: {written.bytes / 1e9:.2f} GB in {shards} safetensors file(s), "
        f"{time.perf_counter() - start:.1f}s")
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------------------------
def adapter_tensors(peft_model, trainable: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter file, keyed as ``PeftModel.from_pretrained`` expects them (peft only selects
    and renames: the values are ``trainable``'s own objects, DTensors included).

    trainable: the trainable parameters, canonical keys relative to the PeftModel.
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
    """Write a PEFT adapter folder from the trainable parameters, then check it. Collective.

    One file, as peft reads it; its tensors are gathered one at a time (an adapter is a small part of a model).
    """
    selected = adapter_tensors(peft_model, trainable)

    def write(tmp: Optional[Path]) -> Written:
        written = write_tensors(selected, tmp, filename_pattern=ADAPTER_WEIGHTS.replace(".safetensors",
                                                                                        "{suffix}.safetensors"),
                                max_shard_size=ONE_FILE)

        def finish():
            config = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
            config.inference_mode = True  # as PeftModel.save_pretrained writes it
            config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            check_adapter(tmp, written.shapes, n_trainable=len(trainable))

        distributed.on_rank0(finish, "write the adapter")
        return written

    return _export_folder(out_dir, "adapter", info, write)


def check_adapter(folder: Path, expected: Dict[str, tuple], n_trainable: int) -> None:
    """The adapter file holds one tensor per trainable tensor (their values were compared as they were written)."""
    path = Path(folder) / ADAPTER_WEIGHTS
    saved = set(saved_tensor_shapes(folder)) if path.is_file() else set()
    if len(saved) != n_trainable or saved != set(expected):
        raise SaveError(f"adapter {path} holds {len(saved)} tensors but {n_trainable} were trained "
                        f"(missing: {_describe(set(expected) - saved) or 'none'}); the trained adapter was "
                        f"NOT saved")


# ---------------------------------------------------------------------------------------------
# Full models
# ---------------------------------------------------------------------------------------------
def tied_copies(lm, names: Iterable[str]) -> set:
    """The names among ``names`` that are tied copies of another one there (lm_head.weight of a model with tied
    embeddings): transformers leaves them out of the files and ties them again when loading."""
    declared = set(getattr(lm, "all_tied_weights_keys", None) or {})
    names = set(names)
    aliases = defaultdict(list)
    for name, param in lm.named_parameters(remove_duplicate=False):
        aliases[id(param)].append(canonical_name(name))
    copies = set()
    for same in aliases.values():
        present = sorted(n for n in set(same) if n in names)
        copies.update([n for n in present if n in declared][:len(present) - 1])
    return copies


def saved_format(lm, sources: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[Convert]]:
    """transformers' reverse weight conversion (a model loaded by from_pretrained may carry renamings, fused MoE
    experts...), applied per layer while writing, and ``sources`` in the order save_pretrained then writes them
    (sorted by its natural key); ``(sources, None)`` when the model has no conversion."""
    try:
        from transformers.core_model_loading import dot_natural_key, revert_weight_conversion
    except ImportError:  # a transformers without weight conversions
        return sources, None
    meta = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in sources.items()}
    if revert_weight_conversion(lm, meta) is meta:  # its shortcut when there is nothing to do
        return sources, None
    ordered = dict(sorted(sources.items(), key=lambda kv: dot_natural_key(kv[0])))
    return ordered, lambda group: revert_weight_conversion(lm, group)


def export_model(lm, state_dict: Dict[str, torch.Tensor], out_dir: Path, tokenizer=None,
                 dtype: Optional[torch.dtype] = None, info: Optional[dict] = None,
                 max_shard_size=MAX_SHARD_SIZE) -> Path:
    """Write a Hugging Face folder from the model's tensors, shard by shard, then check it. Collective.

    dtype: cast floating-point tensors to this dtype (the dtype the base checkpoint was stored in);
    config.json states the dtype the weights are written in.
    """
    ignored = set(getattr(lm, "_keys_to_ignore_on_save", None) or ())
    sources = {canonical_name(k): v for k, v in state_dict.items() if canonical_name(k) not in ignored}
    tied = tied_copies(lm, sources)
    sources = {k: v for k, v in sources.items() if k not in tied}
    sources, convert = saved_format(lm, sources)
    floating = [v.dtype for v in sources.values() if v.is_floating_point()]
    weights_dtype = dtype or (floating[0] if floating else None)

    def write(tmp: Optional[Path]) -> Written:
        written = write_tensors(sources, tmp, dtype=dtype, convert=convert, max_shard_size=max_shard_size,
                                index_metadata={"total_parameters": lm.num_parameters()})

        def finish():
            _write_model_files(lm, tmp, weights_dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            check_model_folder(tmp, written.shapes if convert is not None else sources, tied=tied)

        distributed.on_rank0(finish, "write the model")
        return written

    return _export_folder(out_dir, "model", info, write)


def _write_model_files(lm, folder: Path, weights_dtype: Optional[torch.dtype]) -> None:
    """config.json (stating the written dtype), generation_config.json and remote code, as save_pretrained writes
    them."""
    config = lm.config
    before = (getattr(config, "dtype", None), getattr(config, "architectures", None))
    if weights_dtype is not None:
        config.dtype = str(weights_dtype).removeprefix("torch.")
    config.architectures = [type(lm).__name__.removeprefix("FSDP")]  # fully_shard renames the class
    try:
        config.save_pretrained(folder)
    finally:
        config.dtype, config.architectures = before
    if lm.can_generate():
        lm.generation_config.save_pretrained(folder)
    if lm.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(lm, folder, config=config)


def saved_tensor_shapes(folder: Path) -> Dict[str, tuple]:
    """Names and shapes of every tensor in a folder's safetensors files (headers only, no data read)."""
    return {name: shape for name, (_, shape, _) in read_headers(sorted(Path(folder).glob("*.safetensors"))).items()}


def check_model_folder(folder: Path, state_dict: Dict[str, torch.Tensor], tied: set = frozenset()) -> None:
    """Every tensor of the state dict (anything with a shape) is in the folder with its shape (tied copies may be
    left out). Reads the files' headers only."""
    saved = saved_tensor_shapes(folder)
    shape = {k: tuple(v) if isinstance(v, tuple) else tuple(v.shape) for k, v in state_dict.items()}
    missing = set(shape) - set(saved) - set(tied)
    wrong = [k for k in set(shape) & set(saved) if saved[k] != shape[k]]
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
