"""Saving when the disk is full or a file-size limit (``ulimit -f``) bites.

torch.save reports both as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...``,
which names neither the file nor the cause. :func:`guard_saves` wraps the checkpoint hook: on a failed
save it removes the temporary folders the save left behind (the previous checkpoint and the exported
model are never touched: saves are atomic, see utils/io.py) and raises :class:`SaveError`, one line that
names the folder and the cause. :func:`warn_if_low_disk` compares free space with the expected size of
the checkpoints before training starts.
"""
from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

from shardtune.errors import SaveError
from shardtune.utils import distributed
from shardtune.utils.io import TMP_MARKER
from shardtune.utils.logging import warn

MB = 2**20


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def disk_failure_cause(folder: Path, exc: BaseException) -> Optional[str]:
    """Why writing into ``folder`` failed when the disk or a size limit is to blame, in words (torch's own
    message often hides the errno); None when the failure has another cause."""
    code = getattr(exc, "errno", None)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device ({_free_bytes(folder) / MB:.0f} MB free)"
    if code == errno.EFBIG or limit != resource.RLIM_INFINITY:
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit / MB:.1f} MB"
        return f"a file exceeded the file-size limit (ulimit -f: {shown})"
    if _free_bytes(folder) < 64 * MB:
        return f"the disk is full ({_free_bytes(folder) / MB:.0f} MB free)"
    return None


def _temporaries(folders: Iterable[Path]) -> set:
    return {p for f in folders if f.is_dir() for p in f.iterdir() if p.name.startswith(TMP_MARKER)}


def guard_saves(save: Callable, folders: Iterable[Path]) -> Callable:
    """``save`` (the TrainContext.save_checkpoint hook), turning an OS-level write failure into a SaveError
    after removing the temporary folders it left in ``folders``."""
    folders = [Path(f) for f in folders]

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: DCP's wrapper

    def guarded(state, reason: str):
        before = _temporaries(folders)
        try:
            return save(state, reason)
        except (OSError, RuntimeError, CheckpointException) as exc:
            filename = getattr(exc, "filename", None)
            where = Path(filename).parent if filename else folders[0]
            cause = disk_failure_cause(where, exc)
            if cause is None:
                raise
            if distributed.is_main():
                for leftover in _temporaries(folders) - before:
                    shutil.rmtree(leftover, ignore_errors=True)
            step = getattr(exc, "checkpoint_step", state.step)  # a background write's step (model_checkpointing)
            raise SaveError(f"could not save the checkpoint of step {step} into {where}: {cause}; the "
                            "previous checkpoint and model are intact") from exc

    return guarded


def warn_if_low_disk(folder: Path, checkpoint_bytes: int, copies: int, export_bytes: int) -> None:
    """Warn when ``folder``'s file system cannot hold ``copies`` checkpoints plus the exported model."""
    needed = checkpoint_bytes * copies + export_bytes
    free = _free_bytes(Path(folder))
    if free < needed:
        warn(f"{folder} has {free / MB:.0f} MB free, but {copies} checkpoints of about {checkpoint_bytes / MB:.0f} MB "
             f"and the exported model ({export_bytes / MB:.0f} MB) need {needed / MB:.0f} MB: saves will fail; free "
             "space or lower --keep_last_n_checkpoints")
