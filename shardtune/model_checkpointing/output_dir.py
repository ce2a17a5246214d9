"""One run per output folder: a lock, a run id, and no silent mixing with an earlier run's results.

* The folder is locked (``flock`` on the folder itself, so no file is written for it) for as long as
  the run's rank 0 lives; the kernel drops the lock when that process dies, so a crashed run never
  leaves a stale lock behind. A second run on a locked folder stops with one line.
* A run that starts without ``--resume_from`` in a folder that holds another run's model or
  checkpoints stops with one line; ``--overwrite_output_dir`` removes those results and starts afresh.
  Otherwise a new model would replace the old one, pruning could delete the new run's checkpoints in
  favour of the old run's, and ``--resume_from auto`` would resume the *old* run.
* Every run has an id (``run.json``); checkpoints carry it, and ``--resume_from auto`` only picks
  checkpoints of the run that owns the folder.
* Leftovers of killed saves (temporary folders and files) are removed once the lock is held.
* When the run ends, run.json records its ``outcome``: ``completed``, ``preempted`` or ``failed: <the one
  line>`` (shardtune/cli.py decides; rank 0 writes it, or ``shardtune run``'s launcher when rank 0 died without
  writing it). Only into the run.json of this run (its id), so that a run rejected before it replaced an earlier
  run's file leaves that file alone.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.model_checkpointing.layout import checkpoint_root, list_checkpoint_dirs, remove_tree
from shardtune.utils import distributed
from shardtune.utils.io import TMP_MARKER, atomic_write_text
from shardtune.utils.logging import log

RUN_FILE = "run.json"
MODEL_DIR = "model"

_held_locks: Dict[Path, int] = {}  # folder -> open descriptor: the lock lives as long as it does
_this_run: Optional[Tuple[Path, str]] = None  # (run.json, run id) of the run this process claimed (rank 0)


@dataclass(frozen=True)
class RunDir:
    """The output folder as this run found it."""

    path: Path
    run_id: str                 # this run's id (a resumed run keeps the id of the run it continues)
    previous_run_id: Optional[str]  # the id in run.json before this run started, if any


def read_run_id(output_dir: Path) -> Optional[str]:
    try:
        return json.loads((Path(output_dir) / RUN_FILE).read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lock_output_dir(output_dir: Path) -> None:
    """Take the folder's lock for the life of this process; one line if another live run holds it."""
    if Path(output_dir).resolve() in _held_locks:  # this process holds it already
        return
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"--output_dir {output_dir} is in use by another running shardtune run; wait for it to "
                          f"finish or choose another --output_dir") from None
    _held_locks[Path(output_dir).resolve()] = fd


def release_locks() -> None:
    while _held_locks:
        os.close(_held_locks.popitem()[1])


def previous_results(run: RunConfigs) -> List[Path]:
    """What an earlier run left in this output folder: its model, its checkpoints, its run file."""
    out = Path(run.train.output_dir)
    found = [p for p in (out / MODEL_DIR, out / RUN_FILE) if p.exists()]
    return found + list_checkpoint_dirs(checkpoint_root(run))


def claim_output_dir(run: RunConfigs) -> RunDir:
    """Rank 0: lock the output folder and decide whether this run may use it, before any expensive work.
    Writes nothing; a folder that does not exist yet is created and locked by :func:`lock_new_output_dir`
    once every input is checked (so that a rejected run leaves no folder behind)."""
    t = run.train
    out = Path(t.output_dir)
    exists = out.is_dir()
    if exists:
        lock_output_dir(out)
    previous_id = read_run_id(out)
    found = previous_results(run)  # also a --dist_checkpoint_root_folder outside the output folder
    if found and not t.resume_from and not t.overwrite_output_dir:
        raise ConfigError(f"--output_dir {out} holds the results of an earlier run ({found[0]}); resume it with "
                          f"--resume_from auto, start afresh with --overwrite_output_dir (deletes them), or choose "
                          f"another --output_dir")
    if exists:
        remove_leftovers(run)
    run_id = previous_id if (t.resume_from and previous_id) else uuid.uuid4().hex[:12]
    _own_run_file(out, run_id)
    return RunDir(out, run_id, previous_id)


def lock_new_output_dir(run_dir: RunDir) -> None:
    """Rank 0: create the output folder if this run is the first to use it, and hold its lock."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    lock_output_dir(run_dir.path)


def start_run(run: RunConfigs, run_dir: RunDir, run_id: str) -> None:
    """Rank 0, just before training: with --overwrite_output_dir remove the earlier run's results, then
    record this run's id."""
    if run.train.overwrite_output_dir and not run.train.resume_from:
        for path in previous_results(run):
            if path.name != RUN_FILE:
                log(f"--> --overwrite_output_dir: removing {path}")
                remove_tree(path)
    atomic_write_text(run_dir.path / RUN_FILE, json.dumps({"run_id": run_id, "started_at": time.strftime(
        "%Y-%m-%dT%H:%M:%S")}) + "\n")
    _own_run_file(run_dir.path, run_id)


def _own_run_file(output_dir: Path, run_id: str) -> None:
    """Remember whose run.json this process will record the outcome in, and tell `shardtune run`'s launcher."""
    global _this_run
    _this_run = (Path(output_dir).resolve() / RUN_FILE, run_id)
    distributed.tell_launcher("run_file.json", {"path": str(_this_run[0]), "run_id": run_id})


def record_outcome(outcome: str) -> bool:
    """Record how this process's run ended in its run.json, once; False when this process claimed no run."""
    claimed = forget_claim()
    return claimed is not None and record_outcome_at(*claimed, outcome)


def forget_claim() -> Optional[Tuple[Path, str]]:
    """Forget (and return) the run this process claimed: a new run in the same process starts unclaimed."""
    global _this_run
    claimed, _this_run = _this_run, None
    return claimed


def record_outcome_at(run_file: Path, run_id: str, outcome: str) -> bool:
    """Add ``outcome`` and the time to ``run_file`` (atomically) if it belongs to run ``run_id``."""
    try:
        record = json.loads(Path(run_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("run_id") != run_id:
        return False
    record.update(outcome=outcome, ended_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_text(Path(run_file), json.dumps(record) + "\n")
    return True


def remove_leftovers(run: RunConfigs) -> None:
    """Temporary folders and files of saves that were killed (this run holds the lock, so none is live)."""
    out = Path(run.train.output_dir)
    places = [out, checkpoint_root(run)]
    stale = [p for place in places if place.is_dir() for p in place.iterdir() if p.name.startswith(TMP_MARKER)]
    from shardtune.datasets import CACHE_SUBDIR

    cache = out / CACHE_SUBDIR
    if cache.is_dir():  # `datasets` writes its Arrow files through tmp* names and renames them
        stale += [p for p in cache.iterdir() if p.name.startswith("tmp")]
    for path in stale:
        log(f"--> removing {path}, left by an interrupted save")
        remove_tree(path)
