"""``shardtune run`` (shardtune/launch.py) and the workers' end under a launcher: real processes, gloo, the tiny model.

* The job's exit status is the workers': 2 for a bad flag, 75 when stopped by SIGTERM (and ``--resume_from auto``
  then completes with 0), 1 for a failure (divergence, for real: ``--lr 1e30``); the last line is the workers' one
  line, with no traceback and no torchrun report; run.json records the outcome of each (and of a usage error found
  once the output folder is claimed).
* ``kill -9`` of the launcher (torchrun's and ``shardtune run``): the workers notice, checkpoint and exit; none is
  alive 10 s later, and every checkpoint in the output folder is intact.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT_S
from test_faults import ENV, REPO, checkpoints, cli_args, log_of, steps_logged, wait_for
from test_fsdp_support import base_kwargs

RUN = [sys.executable, "-m", "shardtune", "run", "--nproc_per_node", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "finetuning.py")]
WORKERS_GONE_WITHIN_S = 10  # the requirement: workers notice a dead launcher within seconds


def start(launcher: list, flags: dict, out_dir: Path) -> subprocess.Popen:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(out_dir.parent / f"{out_dir.name}.log", "w")
    return subprocess.Popen([*launcher, *cli_args(flags)], stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=HANG_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()


def last_line(out_dir: Path) -> str:
    return [ln for ln in log_of(out_dir).splitlines() if ln.strip()][-1]


def outcome(out_dir: Path) -> dict:
    return json.loads((out_dir / "run.json").read_text())


def assert_no_report(out_dir: Path) -> None:
    log = log_of(out_dir)
    assert "Traceback" not in log and "ChildFailedError" not in log and "Root Cause" not in log, log[-3000:]


def test_a_bad_flag_ends_the_job_with_status_2_and_one_line(tmp_path):
    proc = subprocess.run([*RUN, "--enable_fsdp", "--lrr", "1", "--output_dir", str(tmp_path / "out")], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]] and "--lrr" in lines[-1]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for rejected input
    # a bad launcher option: the same, before any worker starts
    proc = subprocess.run([*RUN, "--nnodes", "two", "--enable_fsdp"], env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "--nnodes" in proc.stderr


@pytest.mark.slow
def test_sigterm_is_status_75_and_the_resumed_job_completes_with_0(tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "out"
    flags = base_kwargs(tiny_llama_dir, out_dir, max_train_step=100_000)
    proc = start(RUN, flags, out_dir)
    wait_for(lambda: steps_logged(out_dir) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 75, log_of(out_dir)[-3000:]
    (name,) = checkpoints(out_dir)
    assert last_line(out_dir).startswith("stopped by SIGTERM after step") and name in last_line(out_dir)
    assert_no_report(out_dir)
    first = outcome(out_dir)
    assert first["outcome"] == "preempted"

    stopped = int(name.split("_")[1])
    resumed = start(RUN, {**flags, "max_train_step": stopped + 1, "resume_from": "auto"}, tmp_path / "resumed")
    assert finish(resumed) == 0, log_of(tmp_path / "resumed")[-3000:]
    assert steps_logged(out_dir) == stopped + 1
    assert outcome(out_dir)["outcome"] == "completed" and outcome(out_dir)["run_id"] == first["run_id"]


@pytest.mark.slow
def test_a_diverged_run_is_status_1_and_run_json_says_why(tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "out"
    proc = start(RUN, base_kwargs(tiny_llama_dir, out_dir, lr=1e30, max_train_step=6), out_dir)
    assert finish(proc) == 1, log_of(out_dir)[-3000:]
    line = last_line(out_dir)
    assert line.startswith("error: ") and "diverged" in line
    assert_no_report(out_dir)
    assert outcome(out_dir)["outcome"] == "failed: " + line.removeprefix("error: ")


def test_run_json_records_a_usage_error_found_after_the_folder_was_claimed(tiny_llama_dir, tmp_path, capsys):
    from shardtune.cli import cli

    out_dir = tmp_path / "out"
    flags = cli_args(base_kwargs(tiny_llama_dir, out_dir, enable_fsdp=False, max_train_step=1, context_length=64))
    assert cli(flags) == 0  # one process, in this one
    first = outcome(out_dir)
    assert first["outcome"] == "completed"
    capsys.readouterr()
    assert cli([*flags, "--resume_from", str(tmp_path / "nowhere")]) == 2  # found once the folder is claimed
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --resume_from")
    assert outcome(out_dir) == {**first, "outcome": "failed: " + line.removeprefix("error: "),
                                "ended_at": outcome(out_dir)["ended_at"]}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (now init) has not collected it yet


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [TORCHRUN, RUN], ids=["torchrun", "shardtune_run"])
def test_killing_the_launcher_stops_the_workers_and_keeps_the_checkpoints(launcher, tiny_llama_dir, tmp_path):
    from shardtune.model_checkpointing.integrity import verify

    out_dir = tmp_path / "out"
    proc = start(launcher, base_kwargs(tiny_llama_dir, out_dir, max_train_step=100_000, save_every_n_steps=2),
                 out_dir)
    try:
        wait_for(lambda: checkpoints(out_dir) and steps_logged(out_dir) >= 3, proc, "a checkpoint and step 3")
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + WORKERS_GONE_WITHIN_S
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [pid for pid in workers if _alive(pid)]
    finally:
        for pid in workers if "workers" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not alive, log_of(out_dir)[-3000:]
    saved = checkpoints(out_dir)
    ckpt_root = out_dir / "checkpoints" / "fine-tuned"
    assert saved and all(not verify(ckpt_root / name).problems for name in saved)
    assert int(saved[-1].split("_")[1]) == steps_logged(out_dir)  # the step it stopped after is saved
    assert outcome(out_dir)["outcome"] == "preempted"


# A worker whose launcher dies (the launcher: a Python process that starts the worker and waits, killed by the test).
# The worker arms the watcher, optionally trains (enters and leaves a StopRequest: a peer noticed the death first and
# the agreed stop is done), waits until its launcher is gone and the watcher has seen it, then ends by itself.
_ORPHANED_WORKER = r"""
import os, sys, time
from pathlib import Path
from shardtune.training import preemption
from shardtune.utils.signals import PARENT_POLL_S
marks, trained = Path(sys.argv[1]), sys.argv[2] == "trained"
preemption.stop_when_launcher_dies(lambda line: (marks / "gave_up").write_text(line))
if trained:
    with preemption.StopRequest():
        pass
(marks / "armed").write_text("")
launcher = os.getppid()
while os.getppid() == launcher:
    time.sleep(0.05)
time.sleep(4 * PARENT_POLL_S)  # the watcher has looked at the parent again meanwhile
if not (marks / "gave_up").exists():
    (marks / "finished").write_text("")
"""


@pytest.mark.parametrize("trained", [False, True], ids=["before_training", "after_the_agreed_stop"])
def test_a_dead_launcher_gives_up_at_once_only_before_training(trained, tmp_path):
    """After training (the stop agreed because a peer saw the death first, or an export in progress) the worker
    finishes by itself within the launcher's grace; before training there is nothing to save, it gives up at once."""
    worker = tmp_path / "worker.py"
    worker.write_text(_ORPHANED_WORKER)
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                                 sys.executable, str(worker), str(tmp_path), "trained" if trained else "fresh"],
                                env={**ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(HANG_TIMEOUT_S)}, cwd=REPO)
    try:
        wait_for(lambda: (tmp_path / "armed").exists(), launcher, "the worker armed")
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while not any((tmp_path / m).exists() for m in ("gave_up", "finished")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        launcher.kill()
    if trained:
        assert (tmp_path / "finished").exists() and not (tmp_path / "gave_up").exists()
    else:
        assert "nothing to save yet" in (tmp_path / "gave_up").read_text()
