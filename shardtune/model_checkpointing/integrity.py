"""Checksums of checkpoint files: written when a checkpoint is saved, verified before it is resumed.

``checksums.json`` in a checkpoint folder maps every file's relative path to its size and CRC-32
(``state.json``, written last and parsed on load, and the manifest itself are not listed). A damaged
checkpoint (truncated, zeroed or missing file, flipped bytes) is thereby caught before its weights
reach the model; ``--resume_from auto`` then falls back to the newest intact one.

The work is spread over ranks: rank r reads every world-th file, and the results are gathered, so a
large sharded checkpoint is read back once in parallel, not by rank 0 alone. Both functions are
collective: every rank calls them.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Dict, List

import torch.distributed as dist

from shardtune.utils import distributed

MANIFEST = "checksums.json"
UNLISTED = {MANIFEST, "state.json"}
_CHUNK = 16 << 20


def file_digest(path: Path) -> List[int]:
    """[size in bytes, CRC-32] of one file."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return [size, crc]


def _listed_files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in UNLISTED)


def _spread(names: List[str], fn) -> Dict[str, object]:
    """fn(name) for every name, each rank taking every world-th one; the merged results on every rank."""
    group = distributed.multi_rank()
    rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    mine = {name: fn(name) for name in names[rank::world]}
    if not group:
        return mine
    parts: List[Dict[str, object]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def write_manifest(folder: Path, names: List[str] = None) -> None:
    """Checksum every file in ``folder`` (collective) and write the manifest (rank 0). Call after every
    rank's files are written (a barrier) and before the state file that marks the checkpoint complete."""
    folder = Path(folder)
    if names is None:
        names = _listed_files(folder)
    digests = _spread(names, lambda name: file_digest(folder / name))
    if not distributed.group_up() or dist.get_rank() == 0:
        (folder / MANIFEST).write_text(json.dumps(digests, indent=0, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(folder: Path):
    """The manifest's {file: [size, crc]}, None when the checkpoint has none (older format)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def verify(folder: Path, manifest: dict) -> List[str]:
    """Problems found in ``folder`` against its manifest (empty: intact). Collective; every rank gets the list."""
    folder = Path(folder)

    def check(name: str) -> str:
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size, crc = file_digest(path)
        want_size, want_crc = manifest[name]
        if size != want_size:
            return f"{path}: {size} bytes, {want_size} written"
        if crc != want_crc:
            return f"{path}: contents changed since it was written (checksum mismatch)"
        return ""

    results = _spread(sorted(manifest), check)
    return [results[name] for name in sorted(results) if results[name]]
