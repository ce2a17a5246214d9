"""Periodic checkpoints written in the background (model_checkpointing/async_save.py), under real torchrun with 2
gloo ranks on CPU:

* a kill -9 while a background write is pending leaves the previous checkpoint the newest valid one; the resumed
  run continues from it and its next save removes the leftover;
* the end of the run waits for the last save: the process exits 0 only once that checkpoint is sealed;
* the log says what a checkpoint costs on disk, and how long training was blocked.

The write is held deterministically (no wall time) by the test hook $SHARDTUNE_HOLD_CHECKPOINT_WRITE=STEP:PATH: the
writer thread of that step's checkpoint creates PATH.held and waits until PATH exists. And resuming a checkpoint
written in the background is bit-exact.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import ENV, GUARD_S, REPO, _worker_pid, checkpoints, cli_args, log_of, wait_for
from test_fsdp_support import base_kwargs
from test_resume import _interrupted_vs_uninterrupted

from shardtune.model_checkpointing import integrity
from shardtune.model_checkpointing.async_save import HOLD_ENV

SIZE_LINE = re.compile(r"--> checkpoint step (\d+) \(SHARDED_STATE_DICT\) saved to \S+ \(\d+\.\d (?:MB|GB) on disk; "
                       r"training blocked \d+\.\d s, written in the background in \d+\.\d s\)")


def launch_held(flags: dict, out_dir: Path, hold_step: int, release: Path) -> subprocess.Popen:
    """torchrun with 2 ranks, holding the write of ``hold_step``."""
    log = open(out_dir.parent / f"{out_dir.name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "finetuning.py"), *cli_args(flags)], stdout=log, stderr=subprocess.STDOUT,
                            env={**ENV, HOLD_ENV: f"{hold_step}:{release}"}, cwd=REPO)


def kill_9(launcher: subprocess.Popen) -> None:
    """SIGKILL both workers (each in its own session: torchrun starts them so) and the launcher; returns once they
    are gone (their files closed: the output folder's lock released)."""
    workers = [_worker_pid(launcher, rank) for rank in (0, 1)]
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    launcher.kill()
    launcher.wait(timeout=GUARD_S)

    def gone(pid: int) -> bool:
        try:
            return "\tZ" in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:4]
        except (FileNotFoundError, IndexError):
            return True

    deadline = time.monotonic() + GUARD_S
    while not all(map(gone, workers)):
        assert time.monotonic() < deadline, "the killed workers did not end"
        time.sleep(0.05)


def root_of(out_dir: Path) -> Path:
    return out_dir / "checkpoints" / "fine-tuned"


def sealed(folder: Path) -> bool:
    verdict = integrity.verify(folder)
    return verdict.coverage is integrity.Coverage.FULL and not verdict.problems


@pytest.mark.slow
def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(tiny_llama_dir, tmp_path):
    out, release = tmp_path / "out", tmp_path / "release"
    flags = base_kwargs(tiny_llama_dir, out, max_train_step=8, save_every_n_steps=2, keep_last_n_checkpoints=5)
    proc = launch_held(flags, out, hold_step=4, release=release)
    try:
        # step 2's checkpoint is sealed before step 4's write starts (one save in flight); step 6's save then waits
        # for step 4's, so the run cannot end while the write is held
        wait_for(lambda: Path(f"{release}.held").exists(), proc, "the held write of step 4")
        kill_9(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert SIZE_LINE.search(log_of(out)).group(1) == "2"
    assert checkpoints(out) == ["step_000002"] and sealed(root_of(out) / "step_000002")
    assert (root_of(out) / ".tmp-step_000004").is_dir()  # the pending write: never resumed

    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(REPO / "finetuning.py"), *cli_args({**flags, "max_train_step": 4,
                                                                      "resume_from": "auto"})],
                             env=ENV, cwd=REPO, capture_output=True, text=True, timeout=GUARD_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "restored step 2" in resumed.stdout
    assert checkpoints(out) == ["step_000002", "step_000004"] and sealed(root_of(out) / "step_000004")
    assert not [p for p in root_of(out).iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_the_end_of_the_run_waits_for_the_last_background_save(tiny_llama_dir, tmp_path):
    out, release = tmp_path / "out", tmp_path / "release"
    flags = base_kwargs(tiny_llama_dir, out, max_train_step=4, save_every_n_steps=4)  # the last step's, no export
    proc = launch_held(flags, out, hold_step=4, release=release)
    try:
        wait_for(lambda: "waiting for the checkpoint of step 4" in log_of(out), proc, "the end of the run's wait")
        assert proc.poll() is None and checkpoints(out) == []  # training is over; the write is held
        release.touch()
        status = proc.wait(timeout=GUARD_S)
    finally:
        if proc.poll() is None:
            release.touch()
            proc.kill()
    log = log_of(out)
    assert status == 0, log[-3000:]
    assert checkpoints(out) == ["step_000004"] and sealed(root_of(out) / "step_000004")
    assert [m.group(1) for m in SIZE_LINE.finditer(log)] == ["4"]
    assert log.index("saved to") < log.index("--> summary")  # sealed before the run reported its end
    assert not [p for p in root_of(out).iterdir() if p.name.startswith(".tmp-")]


def test_resume_from_a_background_checkpoint_is_exact(tiny_llama_dir, tmp_path):
    """The checkpoint of step 3 is written in the background (the default; the log line says so) and resuming it
    gives exactly the uninterrupted run's losses (fp32, 2 ranks)."""
    a, b = _interrupted_vs_uninterrupted(tmp_path, tiny_llama_dir, 2, 3, 6)
    assert b == a  # exactly
    assert [m.group(1) for m in SIZE_LINE.finditer((tmp_path / "rb1" / "rank0.log").read_text())] == ["3"]


def test_the_background_writer_reads_each_written_file_once(tmp_path, monkeypatch):
    """DCP reports one result per tensor and puts many tensors in one file: the checksum of each file is taken once
    (taking it per tensor made a 1.5 GB checkpoint take 340 s instead of 8)."""
    import torch

    from shardtune.model_checkpointing import async_save

    reads = []
    real = async_save.file_digest
    monkeypatch.setattr(async_save, "file_digest", lambda path: reads.append(path.name) or real(path))
    writer = async_save.BackgroundWriter(torch.device("cpu"), 600)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write = writer.start({f"t{i}": torch.full((64,), float(i)) for i in range(40)}, folder)
    write.future.result()
    writer.close()
    data_files = sorted(p.name for p in folder.glob("*.distcp"))
    assert data_files and sorted(reads) == data_files  # each once
    assert set(write.digests) == set(data_files)
