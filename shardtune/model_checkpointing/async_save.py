"""Periodic checkpoints written in the background: training stands still only while the state is copied.

A synchronous SHARDED_STATE_DICT save blocks training while DCP writes and fsyncs every shard and while the
manifest's checksums read them back: 52.8 s for the 18.4 GB of a 3B model on one H200. Here
(:class:`BackgroundWriter`) only the copy of the weights and optimizer state into host memory blocks (staging:
after it, the optimizer may change the originals); ``torch.distributed.checkpoint.async_save`` writes the copy in
a thread, and that thread also takes the CRC-32 of every file it wrote, so that sealing the checkpoint later reads
back only the small files.

* Its own gloo group. DCP's writer thread runs collectives (plan, results, metadata) while the main thread runs
  the training step's; collectives of one group must be issued in the same order on every rank, which two
  threads cannot promise. A second group, used by the writer thread alone, keeps them apart (gloo: host memory,
  which is where the staged copy is).
* At most one save in flight. The staging buffers (pinned host memory on CUDA) are kept and reused by the next
  save, which stages only once the previous write has ended (Checkpointer waits for it first): one copy of the
  state in host memory for the whole run, never two, and no reallocation of pinned memory per save.
* Completion is agreed, not assumed (:func:`ended_everywhere`): once per step while a save is pending, one tiny
  all-reduce (MIN) of "my write has ended"; the checkpoint is sealed (manifest, rename: checkpoint.py) only when
  every rank's has. A failed write (a full disk) is raised on every rank at that agreement, from the main
  thread, as the exception a synchronous save would have raised.
* Crash safety is the synchronous save's: until it is sealed, the checkpoint is a ``.tmp-step_*`` folder without a
  manifest, which resume never picks; a kill -9 during the write leaves the previous checkpoint the newest valid
  one, and the next save removes the leftover.

Test hook (tests/test_async_checkpoint.py): with ``SHARDTUNE_HOLD_CHECKPOINT_WRITE=STEP:PATH`` in the
environment, the writer thread of the checkpoint of step STEP creates ``PATH.held`` and waits until PATH exists
before it writes anything: a test can then kill the run, or let it end, while that write is certainly pending,
without relying on timing.
"""
from __future__ import annotations

import datetime
import os
import time
import warnings
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from shardtune.errors import SaveError
from shardtune.model_checkpointing.integrity import Digest, file_digest
from shardtune.utils import distributed

HOLD_ENV = "SHARDTUNE_HOLD_CHECKPOINT_WRITE"


def _hold_for_test(folder: Path) -> None:
    """The test hook (module docstring): wait before writing the checkpoint named in $SHARDTUNE_HOLD_CHECKPOINT_WRITE."""
    step, _, release = os.environ.get(HOLD_ENV, "").partition(":")
    if not release or not folder.name.endswith(f"step_{int(step):06d}"):
        return
    Path(f"{release}.held").touch()
    while not Path(release).exists():
        time.sleep(0.05)


class _DigestingWriter(dcp.FileSystemWriter):
    """DCP's file writer (which fsyncs what it writes), that also records the CRC-32 of this rank's files."""

    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self.folder = folder
        self.digests: Dict[str, Digest] = {}

    def write_data(self, plan, planner):
        _hold_for_test(self.folder)
        written = super().write_data(plan, planner)  # written (and fsynced) when it returns
        # One result per tensor, many tensors per file: each file is read once (setdefault would read it per tensor)
        for name in {result.storage_data.relative_path for result in written.wait()}:
            if name not in self.digests:
                self.digests[name] = file_digest(self.folder / name)
        return written


@dataclass
class BackgroundWrite:
    """One checkpoint's shards being written by DCP's thread into ``folder``."""

    folder: Path
    future: futures.Future
    writer: _DigestingWriter
    started: float  # time.perf_counter() when the write began

    @property
    def digests(self) -> Dict[str, Digest]:
        """[size, CRC-32] of the files this rank wrote (complete once the write has ended)."""
        return self.writer.digests


class BackgroundWriter:
    """Stages state dicts in host memory and writes them with DCP in a thread. One per run; ``timeout_s``: how long
    the writer thread's collectives wait for the other ranks (the run's --dist_timeout_s, as a synchronous save)."""

    def __init__(self, device: torch.device, timeout_s: float):
        self.device, self.timeout_s = device, timeout_s
        self._stager: Optional[DefaultStager] = None
        self._group = None

    def _ensure_started(self) -> None:
        if self._stager is None:
            cuda = self.device.type == "cuda"
            # Staged synchronously (use_async_staging=False): the optimizer step after this one changes the tensors
            # in place, so the copy must be complete when training resumes. Pinned memory (CUDA): a faster copy,
            # allocated once and reused. No shared memory: the writer is a thread, not a process.
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        if self._group is None and distributed.multi_rank():
            # Collective: every rank starts its first background save at the same step.
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))

    def start(self, state_dict: dict, folder: Path) -> BackgroundWrite:
        """Copy ``state_dict`` into host memory (returns when the copy is complete) and write it into ``folder`` in
        the background. Collective. The caller lets the previous write end first (the staging buffers are reused)."""
        self._ensure_started()
        if not distributed.group_up():
            # DCP warns from its thread on every save without a process group; for one process that is the intent
            # (a filter, not weights.quiet_single_process: the thread outlives any context manager around this call).
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        writer = _DigestingWriter(folder)
        started = time.perf_counter()
        future = dcp.async_save(state_dict, storage_writer=writer, process_group=self._group,
                                async_stager=self._stager, no_dist=not distributed.group_up())
        return BackgroundWrite(folder, future, writer, started)

    def close(self) -> None:
        """Free the staging buffers (the end of the run; a later save would allocate them again)."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def ended_everywhere(write: BackgroundWrite, wait: bool) -> bool:
    """Whether every rank's part of ``write`` has ended (``wait``: wait for this rank's first). Collective. Raises
    the write's failure on every rank, the same as a synchronous save would (a rank whose own part succeeded raises
    a SaveError saying another rank failed)."""
    if wait:
        futures.wait([write.future])
    if not distributed.agree(int(write.future.done()), op="min"):
        return False
    failure = write.future.exception()
    if distributed.agree(int(failure is not None), op="max"):
        if failure is not None:
            raise failure
        raise SaveError(f"another rank could not write its part of {write.folder}; not saved")
    return True
