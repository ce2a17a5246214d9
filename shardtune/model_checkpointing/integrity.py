"""A checkpoint's manifest: written last, checked before the checkpoint is resumed (or converted).

``manifest.json`` (checkpoint format 2) lists *every other file* of the checkpoint folder with its size
and CRC-32: the weights or DCP shards and ``.metadata``, the optimizer, every rank's RNG file,
``state.json``, ``run_config.yaml``, and a FULL_STATE_DICT checkpoint's ``model/`` folder (weights,
config, adapter and tokenizer files). It ends with a CRC-32 of its own canonical text, so that a changed
byte in the manifest is caught as well. Rank 0 writes it after a barrier, once every rank's files are
written and fsynced, as the last file of the temporary folder that is then renamed into place.

A checkpoint passes when every listed file is there with its size and checksum, and no file is there that
the manifest does not list: loaders pick files up by name (an extra ``model/*.index.json`` or
``rng/rank_*.pt`` would change what is loaded), and a checkpoint folder holds nothing else.

Format 1 (before this version) wrote ``checksums.json`` instead, covering the weight, optimizer and RNG
files but not ``state.json`` nor ``run_config.yaml``. Such checkpoints are verified as far as their
checksums go, and resume.py says in one warning that their state files are not covered.

CRC-32 catches accidental damage (every change within 4 consecutive bytes, all but 2^-32 of the others); it
is no defence against deliberate forgery. Reading is spread over ranks: rank r reads every world-th file
(a large sharded checkpoint is read back in parallel); what the files hold is judged by one rank.
"""
from __future__ import annotations

import enum
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist

from shardtune.model_checkpointing.layout import RUN_CONFIG_FILE, STATE_FILE
from shardtune.utils import distributed
from shardtune.utils.io import atomic_write_text, fsync_dir

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
LEGACY_MANIFEST = "checksums.json"  # format 1
LEGACY_UNCOVERED = (STATE_FILE, RUN_CONFIG_FILE)  # what format 1's checksums.json left out
_CHUNK = 16 << 20

Digest = List[int]  # [size in bytes, CRC-32]


class Coverage(enum.Enum):
    FULL = "every file"                        # manifest.json
    LEGACY = "weights, optimizer and RNG"      # format 1's checksums.json
    NONE = "nothing"                           # no manifest at all


@dataclass(frozen=True)
class Verdict:
    """What a check found: ``problems`` (one line each, naming the file; empty: it passes) and what was covered."""

    problems: List[str]
    coverage: Coverage


def file_digest(path: Path, sync: bool = False) -> Digest:
    """[size in bytes, CRC-32] of one file; ``sync``: fsync it too (it is read anyway)."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return [size, crc]


def list_files(folder: Path) -> List[str]:
    """Every file under ``folder``, as sorted relative paths."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def digest_files(folder: Path, names: List[str], sync: bool = False,
                 known: Optional[Dict[str, Digest]] = None) -> Dict[str, Optional[Digest]]:
    """Digest of every named file (None: it vanished), each rank reading every world-th one; the merged result
    on every rank. Collective: every rank calls it with the same ``names``. ``known`` (every rank gives one or none):
    digests this rank took already (the files it wrote in the background, async_save.py), not read again."""
    folder = Path(folder)

    def digest(name: str) -> Optional[Digest]:
        try:
            return file_digest(folder / name, sync)
        except FileNotFoundError:
            return None

    group = distributed.multi_rank()
    rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    done: Dict[str, Optional[Digest]] = {}
    if known is not None:
        done = {k: v for k, v in _gathered(dict(known), world).items() if k in set(names)}
        names = [n for n in names if n not in done]
    return {**done, **_gathered({name: digest(name) for name in names[rank::world]}, world)}


def _gathered(mine: dict, world: int) -> dict:
    """Every rank's dict merged, on every rank (collective under more than one rank)."""
    if world == 1:
        return mine
    parts: List[dict] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _render(files: Dict[str, Digest]) -> str:
    """The manifest's exact text: its files, and the CRC-32 of their canonical form (any other text is damaged)."""
    body = json.dumps({"format": MANIFEST_FORMAT, "files": files}, sort_keys=True, separators=(",", ":"))
    return json.dumps({"format": MANIFEST_FORMAT, "files": files, "manifest_crc32": zlib.crc32(body.encode())},
                      indent=1, sort_keys=True) + "\n"


def write_manifest(folder: Path, known: Optional[Dict[str, Digest]] = None) -> None:
    """Seal ``folder``: digest (and fsync) every file in it, then rank 0 writes the manifest. Collective; call once
    every rank has written every file of the checkpoint, and before the folder is renamed into place. ``known``:
    see :func:`digest_files` (files already fsynced and digested by the rank that wrote them)."""
    folder = Path(folder)
    distributed.barrier()  # every rank's files are written
    names = distributed.on_rank0(lambda: [n for n in list_files(folder) if n != MANIFEST], "list the checkpoint")
    digests = digest_files(folder, names, sync=True, known=known)

    def write():
        missing = sorted(n for n, d in digests.items() if d is None)
        if missing:
            raise RuntimeError(f"{folder / missing[0]} vanished while the checkpoint was sealed")
        for sub in sorted({(folder / n).parent for n in names}):
            fsync_dir(sub)
        atomic_write_text(folder / MANIFEST, _render(digests))  # fsynced
        fsync_dir(folder)

    distributed.on_rank0(write, "write the checkpoint manifest")


# ---------------------------------------------------------------------------------------------
# Checking (one rank judges; the digests may come from all)
# ---------------------------------------------------------------------------------------------
def _entries(data) -> Dict[str, Digest]:
    """{file: [size, crc]} from a parsed manifest; ValueError if it is not one."""
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, list) and len(v) == 2
                                             and all(isinstance(x, int) for x in v) for k, v in data.items()):
        raise ValueError("not a map of file -> [size, crc32]")
    return data


def read_manifest(folder: Path) -> Dict[str, Digest]:
    """The files manifest.json lists; ValueError (one line) when it is empty, unreadable or changed."""
    text = (Path(folder) / MANIFEST).read_text(encoding="utf-8", errors="replace")
    if not text:
        raise ValueError("empty")
    try:
        files = _entries(json.loads(text)["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__})") from None
    if text != _render(files):
        raise ValueError("changed since it was written (its own checksum does not match)")
    return files


def _read_legacy(folder: Path) -> Dict[str, Digest]:
    text = (Path(folder) / LEGACY_MANIFEST).read_text(encoding="utf-8", errors="replace")
    try:
        return _entries(json.loads(text))
    except ValueError as exc:
        raise ValueError("empty" if not text else f"unreadable ({type(exc).__name__})") from None


def check(folder: Path, names: List[str], digests: Dict[str, Optional[Digest]]) -> Verdict:
    """Judge ``folder`` from its file list and their digests (see :func:`digest_files`) against its manifest."""
    folder = Path(folder)
    if MANIFEST in names:
        coverage, own, unlisted_ok = Coverage.FULL, MANIFEST, {MANIFEST}
    elif LEGACY_MANIFEST in names:
        coverage, own, unlisted_ok = Coverage.LEGACY, LEGACY_MANIFEST, {LEGACY_MANIFEST, *LEGACY_UNCOVERED}
    else:
        return Verdict([], Coverage.NONE)
    try:
        listed = read_manifest(folder) if coverage is Coverage.FULL else _read_legacy(folder)
    except (OSError, ValueError) as exc:
        return Verdict([f"{folder / own}: {exc}"], coverage)
    problems = []
    for name, (size, crc) in sorted(listed.items()):
        got = digests.get(name)
        if got is None:
            problems.append(f"{folder / name}: missing")
        elif got[0] != size:
            problems.append(f"{folder / name}: {got[0]} bytes, {size} written" + (" (emptied)" if not got[0] else ""))
        elif got[1] != crc:
            problems.append(f"{folder / name}: contents changed since it was written (checksum mismatch)")
    for name in sorted(set(names) - set(listed) - unlisted_ok):
        problems.append(f"{folder / name}: not in {own} (a file the checkpoint was not saved with)")
    return Verdict(problems, coverage)


def verify(folder: Path) -> Verdict:
    """List, digest (spread over ranks) and check ``folder``; rank 0's verdict on every rank. Collective."""
    folder = Path(folder)
    names = distributed.on_rank0(lambda: list_files(folder), "list the checkpoint")
    digests = digest_files(folder, names)
    return distributed.on_rank0(lambda: check(folder, names, digests), "verify the checkpoint")


def summary(verdict: Verdict) -> str:
    """The first problem, and how many more there are: one line."""
    more = len(verdict.problems) - 1
    return verdict.problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else "")
