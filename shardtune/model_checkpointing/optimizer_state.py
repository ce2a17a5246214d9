"""The optimizer state of a FULL_STATE_DICT checkpoint, written and read one tensor at a time (collective).

Gathering the whole optimizer state on rank 0 (``get_optimizer_state_dict(full_state_dict=True)``, then
``torch.save``) cost AdamW's two fp32 moments, 8 bytes per trained parameter, in one host's memory: 64 GB at 8B.
Here every state tensor is gathered on its own, in the optimizer's parameter order (the same on every rank), and
written by streaming.py's writer as safetensors shards, read back as they are written:

    optimizer.safetensors, or optimizer-00001-of-0000n.safetensors + optimizer.safetensors.index.json
        one tensor per parameter and state entry, named ``<parameter>.<entry>``
        (``model.layers.0.mlp.up_proj.weight.exp_avg``)
    optimizer.json
        the rest: param_groups (hyperparameters, their parameters by name), each parameter's scalar entries
        (AdamW's ``step``) and which tensor holds each of its other entries

Parameters are named canonically, relative to the transformers model or PeftModel (the names its state dict
uses, without the segments wrappers add), so the files read without the training code. Loading reverses it: rank 0
reads one tensor, every rank receives it and keeps its own shard (the parameter's DTensor placement), and the
optimizer gets the shards through ``load_state_dict``. Host memory added, either way: about one shard
(streaming.MAX_SHARD_SIZE) plus the largest tensor. Checkpoints written before this (``optimizer.pt``, the whole
state) still load, by the way they were written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from shardtune.errors import ConfigError, SaveError
from shardtune.model_checkpointing.export import canonical_name
from shardtune.model_checkpointing.streaming import MAX_SHARD_SIZE, read_headers, write_tensors
from shardtune.utils import distributed

TENSORS_PATTERN = "optimizer{suffix}.safetensors"  # huggingface_hub's shard names, as the model's
INFO_FILE = "optimizer.json"
LEGACY_FILE = "optimizer.pt"  # before: the whole state dict, torch.save'd by rank 0
FORMAT = 1

TUPLE, SCALAR = "__tuple__", "__scalar__"  # how optimizer.json spells values JSON has no type for


def named_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[List[Tuple[str, nn.Parameter]]]:
    """Each param group's parameters with their canonical names (without the training wrapper's ``lm.``), in the
    optimizer's order: the order every rank gathers and receives the state in."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = canonical_name(name)
        names.setdefault(id(p), name[len("lm."):] if name.startswith("lm.") else name)
    return [[(names[id(p)], p) for p in group["params"]] for group in optimizer.param_groups]


# ---- values optimizer.json holds --------------------------------------------------------------
def _encode(value, where: str):
    if isinstance(value, torch.Tensor):  # a 0-dim tensor (AdamW's step, a tensor lr): its number and dtype
        return {SCALAR: value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SaveError(f"optimizer state {where} is a {type(value).__name__}, which a FULL_STATE_DICT checkpoint "
                    f"cannot store; not saved (SHARDED_STATE_DICT stores any state)")


def _decode(value):
    if isinstance(value, dict) and SCALAR in value:
        return torch.tensor(value[SCALAR], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict) and TUPLE in value:
        return tuple(_decode(v) for v in value[TUPLE])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _is_stored_as_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and (isinstance(value, DTensor) or value.dim() > 0)


# ---- saving ----------------------------------------------------------------------------------
def save(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Optional[Path],
         max_shard_size=MAX_SHARD_SIZE) -> None:
    """Write the optimizer state into ``folder`` (rank 0's; others may pass None) and check it. Collective."""
    groups = named_parameters(model, optimizer)
    tensors: Dict[str, torch.Tensor] = {}
    state: Dict[str, dict] = {}
    for group in groups:
        for name, p in group:
            entries = optimizer.state.get(p) or {}
            if not entries:
                continue  # never stepped (no gradient yet): nothing to store, as torch's own state_dict
            state[name] = {}
            for key in sorted(entries):
                value = entries[key]
                if _is_stored_as_tensor(value):
                    tensors[f"{name}.{key}"] = value  # live: DTensors are gathered one at a time by the writer
                    state[name][key] = {"tensor": f"{name}.{key}"}
                else:
                    state[name][key] = _encode(value, f"{name}.{key}")
    param_groups = [{**{k: _encode(v, f"param_groups[{i}].{k}") for k, v in g.items() if k != "params"},
                     "params": [name for name, _ in group]}
                    for i, (g, group) in enumerate(zip(optimizer.param_groups, groups))]
    info = {"format": FORMAT, "param_groups": param_groups, "state": state}
    if tensors:  # the same on every rank (every rank's optimizer holds every parameter, sharded or not)
        write_tensors(tensors, folder, filename_pattern=TENSORS_PATTERN, max_shard_size=max_shard_size)

    def finish():
        stored = _stored_shapes(folder)
        expected = {k: tuple(v.shape) for k, v in tensors.items()}
        if stored != expected:  # the values were compared as they were written; every tensor is there?
            missing = sorted(set(expected) - set(stored))
            raise SaveError(f"{folder} holds {len(stored)} of {len(expected)} optimizer tensors (missing: "
                            f"{', '.join(missing[:3]) or 'none'}); the checkpoint was NOT saved")
        (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    distributed.on_rank0(finish, "write the optimizer state")


def _tensor_files(folder: Path) -> List[Path]:
    return sorted(Path(folder).glob(TENSORS_PATTERN.format(suffix="*")))


def _stored_shapes(folder: Path) -> Dict[str, tuple]:
    """Name -> shape of every tensor in the optimizer's safetensors files (headers only)."""
    return {name: where[1] for name, where in _stored_tensors(folder).items()}


def _stored_tensors(folder: Path) -> Dict[str, tuple]:
    """Name -> (file, shape, dtype name) of every tensor in the optimizer's safetensors files (headers only)."""
    return read_headers(_tensor_files(folder))


# ---- loading ---------------------------------------------------------------------------------
def is_legacy(folder: Path) -> bool:
    """Whether ``folder`` holds the optimizer state the way checkpoints before this module wrote it. Rank 0 looks."""
    return distributed.on_rank0(lambda: not (Path(folder) / INFO_FILE).is_file()
                                and (Path(folder) / LEGACY_FILE).is_file(), "read the optimizer state")


def _read_layout(folder: Path) -> dict:
    path = Path(folder) / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); the checkpoint cannot be resumed") from None
    if info.get("format") != FORMAT:
        raise ConfigError(f"{path}: optimizer state format {info.get('format')}, this version reads {FORMAT}")
    info["tensors"] = _stored_tensors(folder)
    missing = sorted(v["tensor"] for entries in info["state"].values() for v in entries.values()
                     if isinstance(v, dict) and "tensor" in v and v["tensor"] not in info["tensors"])
    if missing:
        raise ConfigError(f"{path} names {len(missing)} tensor(s) that no optimizer*.safetensors file of "
                          f"{Path(folder)} holds ({', '.join(missing[:3])}); the checkpoint cannot be resumed")
    return info


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _receive(folder: Path, name: str, where: tuple, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stored tensor ``name``, read by rank 0 and sent to every rank, as this rank's shard of a tensor placed like
    ``like`` (the parameter; its whole self where it is not a DTensor). Collective."""
    from safetensors import safe_open

    filename, shape, dtype = where
    if distributed.is_main():
        with safe_open(str(Path(folder) / filename), framework="pt") as fh:  # closed at once: no pages stay mapped
            whole = fh.get_tensor(name).to(device)
    else:
        whole = torch.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype], device=device)
    if distributed.multi_rank():
        dist.broadcast(whole, src=0)
    if not isinstance(like, DTensor):
        return whole.to(like.device)
    # Every rank holds the whole tensor now: each keeps its own shard (no communication), in storage of its own
    # (a view would keep the whole tensor alive), on the device the parameter's shard lives on.
    local = distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()
    local = local.to(like.to_local().device, copy=True)
    del whole
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def load(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, device: torch.device) -> None:
    """Restore the optimizer state :func:`save` wrote (rank 0 reads ``folder``). Collective."""
    info = distributed.on_rank0(lambda: _read_layout(folder), "read the optimizer state")
    groups = named_parameters(model, optimizer)
    saved_groups = info["param_groups"]
    ours = [sorted(name for name, _ in group) for group in groups]
    theirs = [sorted(g["params"]) for g in saved_groups]
    if ours != theirs:
        differ = sorted(set(sum(ours, [])) ^ set(sum(theirs, [])))
        raise ConfigError(f"{Path(folder) / INFO_FILE} holds the optimizer state of other parameters than this run "
                          f"trains ({len(theirs)} group(s) of {sum(map(len, theirs))}, this run "
                          f"{len(ours)} of {sum(map(len, ours))}; differing: {', '.join(differ[:3]) or 'the groups'})"
                          f"; resume with the flags it was saved with")
    state: Dict[int, dict] = {}
    index = 0
    for group in groups:
        for name, p in group:
            saved = info["state"].get(name)
            if saved is not None:
                state[index] = {key: _receive(folder, value["tensor"], info["tensors"][value["tensor"]], p, device)
                                if isinstance(value, dict) and "tensor" in value else _decode(value)
                                for key, value in saved.items()}
            index += 1
    # load_state_dict pairs saved and current parameters by position within each group: number them in our order.
    first = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
    param_groups = [{**{k: _decode(v) for k, v in saved.items() if k != "params"},
                     "params": list(range(first[i], first[i] + len(groups[i])))}
                    for i, saved in enumerate(saved_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
