"""Writing a model's tensors as safetensors shards, a bounded group of tensors at a time (collective).

Gathering the whole state dict into rank 0's host memory before writing it (and save_pretrained copying it
again) cost about 11 bytes per parameter at the end of a run: 35 GB of host memory for a 3B model, an
out-of-memory failure at 70B after the whole training had run. Here each tensor is gathered on its own (an
FSDP2 DTensor: ``full_tensor()``, a collective every rank calls in the same order), cast to the written dtype
on its device, moved to rank 0's host and buffered until its shard is complete; rank 0 writes the shard with
safetensors, reads it back tensor by tensor, and frees it. Host memory added: about one shard
(MAX_SHARD_SIZE) plus the largest tensor. A single-process run writes its live parameters without copying
them (unless they are cast).

Which tensor goes into which file, and the index, are huggingface_hub's (``split_torch_state_dict_into_shards``,
planned on meta tensors of the written shapes, as transformers' save_pretrained does), so the folder is
exactly what ``from_pretrained`` reads.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch.distributed.tensor import DTensor

from shardtune.errors import SaveError
from shardtune.utils import distributed

# Host memory the writer adds is about one shard: 1 GB keeps saving within ~1-2 GB of the training peak
# on any model size (loaders read any number of shards; the hub's own default is 5 GB).
MAX_SHARD_SIZE = "1GB"
ONE_FILE = 1 << 62  # a shard size no tensor reaches: everything in one file (PEFT adapters must be one file)
INDEX_SUFFIX = ".index.json"
VERIFY_PIECE_BYTES = 16 << 20  # a written tensor is read back and compared in pieces of about this size

# A model's tensors in the order they are gathered; a conversion (convert=) sees one group at a time.
Tensors = Dict[str, torch.Tensor]
Convert = Callable[[Tensors], Tensors]


@dataclass(frozen=True)
class Written:
    """What the writer put in the folder (on rank 0)."""

    shapes: Dict[str, tuple]   # every written tensor's name and shape
    files: List[str]           # the safetensors files (and the index, if any)
    bytes: int                 # their size on disk


def written_dtype(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


@torch.no_grad()
def gather(t: torch.Tensor, dtype: Optional[torch.dtype], keep: bool) -> Optional[torch.Tensor]:
    """``t`` whole, cast to ``dtype`` (floating point only), in host memory where ``keep`` (rank 0).

    Collective for a DTensor: every rank calls it for the same tensor. The cast happens on the device, so the host
    receives only the written copy; a host tensor already in ``dtype`` is returned as it is (no copy).
    """
    if isinstance(t, DTensor):
        if t.device.type != t.device_mesh.device_type:  # CPU-offloaded shards on a GPU mesh: gather on the GPU
            t = t.to(t.device_mesh.device_type)
        t = t.full_tensor()
    if not keep:
        return None
    t = t.detach().to(written_dtype(t, dtype))
    return t.to("cpu").contiguous()


def group_by_layer(names: List[str]) -> List[List[str]]:
    """Consecutive names of one numbered module (``model.layers.3.``) as one group; others alone. A conversion
    that combines tensors (transformers' fused MoE experts) combines them within one layer."""
    groups: List[List[str]] = []
    last = None
    for name in names:
        match = re.match(r"(.*?\.\d+)\.", name)
        key = match.group(1) if match else None
        if key is not None and key == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    return groups


def _as_meta(tensors: Tensors) -> Tensors:
    # fresh meta tensors: views (chunks of a converted tensor) would report their base's storage size
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in tensors.items()}


@dataclass(frozen=True)
class ShardPlan:
    groups: List[List[str]]             # source names, gathered together, in the order every rank gathers them
    written: Tensors                    # meta tensors of what is written, keyed by written name
    filename_to_tensors: Dict[str, List[str]]
    is_sharded: bool
    metadata: dict                      # huggingface_hub's index metadata (total_size)
    due: Dict[int, List[str]]           # group index -> the files complete once that group is gathered

    @classmethod
    def make(cls, sources: Tensors, dtype: Optional[torch.dtype], convert: Optional[Convert],
             filename_pattern: str, max_shard_size) -> "ShardPlan":
        names = list(sources)
        groups = group_by_layer(names) if convert is not None else [[n] for n in names]
        written: Tensors = {}
        last_group: Dict[str, int] = {}
        for i, group in enumerate(groups):
            meta = {k: torch.empty(tuple(sources[k].shape), dtype=written_dtype(sources[k], dtype), device="meta")
                    for k in group}
            out = _as_meta(convert(meta) if convert is not None else meta)
            written.update(out)
            last_group.update({k: i for k in out})
        split = split_torch_state_dict_into_shards(written, filename_pattern=filename_pattern,
                                                   max_shard_size=max_shard_size)
        due: Dict[int, List[str]] = defaultdict(list)
        for filename, members in split.filename_to_tensors.items():
            due[max(last_group[n] for n in members)].append(filename)
        return cls(groups, written, split.filename_to_tensors, split.is_sharded, split.metadata, dict(due))


def read_headers(paths: List[Path]) -> Dict[str, tuple]:
    """Name -> (file name, shape, dtype name) of every tensor in safetensors ``paths`` (headers only, no data read)."""
    from safetensors import safe_open

    found = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                piece = fh.get_slice(key)
                found[key] = (Path(path).name, tuple(piece.get_shape()), piece.get_dtype())
    return found


def _write_shard(path: Path, shard: Tensors) -> int:
    """Write one safetensors file, then read it back and compare, tensor by tensor; returns its size. ``shard`` is
    emptied as it is compared, so that what was gathered is freed as soon as it is known to be on disk."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file(shard, str(path), metadata={"format": "pt"})
    with safe_open(str(path), framework="pt") as fh:
        stored = set(fh.keys())
    if stored != set(shard):
        raise SaveError(f"{path} holds {len(stored)} tensors but {len(shard)} were written to it; the trained "
                        f"model was NOT saved")
    for name in list(shard):
        want = shard.pop(name)
        rows = want.shape[0] if want.dim() else 1
        step = max(1, VERIFY_PIECE_BYTES // max(1, want.nbytes // max(1, rows)))
        for start in range(0, rows, step):
            # Reopened for every piece: the file's pages that a comparison maps are unmapped again right after
            # (they would count as this process's memory until the file is closed).
            with safe_open(str(path), framework="pt") as fh:
                whole = want.dim() == 0 or step >= rows
                got = fh.get_tensor(name) if whole else fh.get_slice(name)[start:start + step]
                same = torch.equal(got, want if whole else want[start:start + step])
                del got
            if not same:
                raise SaveError(f"{path}: tensor {name} differs from the trained one after writing; the trained "
                                f"model was NOT saved")
    return path.stat().st_size


def write_tensors(sources: Tensors, folder: Optional[Path], *, dtype: Optional[torch.dtype] = None,
                  convert: Optional[Convert] = None, filename_pattern: str = "model{suffix}.safetensors",
                  max_shard_size=MAX_SHARD_SIZE, index_metadata: Optional[dict] = None) -> Written:
    """Write ``sources`` (live tensors, DTensors gathered here) as safetensors shards into ``folder`` (rank 0's;
    other ranks may pass None). Collective: every rank calls it with the same names in the same order.

    dtype: cast floating-point tensors to it. convert: maps a group of gathered tensors to the tensors written
    (transformers' reverse weight conversion); groups are then whole layers. A model larger than one shard gets
    ``<pattern>.index.json`` as transformers writes it, with ``index_metadata`` added. Returns what was written
    (rank 0's; other ranks get the plan's names and shapes).
    """
    plan = ShardPlan.make(sources, dtype, convert, filename_pattern, max_shard_size)
    is_main = distributed.is_main()
    buffer: Tensors = {}
    sizes: Dict[str, int] = {}
    for i, group in enumerate(plan.groups):
        gathered = {k: gather(sources[k], dtype, keep=is_main) for k in group}
        if is_main:
            buffer.update(convert(gathered) if convert is not None else gathered)
        del gathered
        for filename in plan.due.get(i, ()):
            def write_one(filename=filename):
                shard = {n: buffer.pop(n) for n in plan.filename_to_tensors[filename]}
                sizes[filename] = _write_shard(folder / filename, shard)

            distributed.on_rank0(write_one, "write the model's weights")

    def write_index():
        index = {"metadata": {**(index_metadata or {}), **plan.metadata},
                 "weight_map": {n: f for f, members in plan.filename_to_tensors.items() for n in members}}
        path = folder / (filename_pattern.format(suffix="") + INDEX_SUFFIX)  # model.safetensors.index.json
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        sizes[path.name] = path.stat().st_size

    if plan.is_sharded:
        distributed.on_rank0(write_index, "write the model's index")
    return Written({k: tuple(v.shape) for k, v in plan.written.items()}, list(sizes), sum(sizes.values()))
