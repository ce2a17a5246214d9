"""``shardtune run``: torchrun's launcher around shardtune's finetuning, with one exit status for the job.

    shardtune run --nproc_per_node 8 [torchrun's other options] [finetuning flags]
    python -m shardtune run --nnodes 2 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 8 ...

The launcher options are torchrun's own, parsed by torchrun's parser and run by ``torch.distributed.run.run``
(rendezvous, restarts, signal forwarding, all as under torchrun); the finetuning flags start at the first token
that is no launcher option. Every worker runs ``python -m shardtune.cli FLAGS``. ``torchrun`` itself exits 1 and
prints its multi-line report whatever its workers said; this launcher returns the workers' status instead, so a
Slurm or Kubernetes script can tell a preemption from a failure:

    2   usage error (any rank)      75  preempted and resumable (every worker exited 75)
    0   completed (every worker)    1   anything else (a failure, a worker that died)

and its last line is the workers' one line (``error: ...`` or the preemption line): no traceback, no torchrun
report (``--debug`` shows both). When the workers end without recording the outcome in run.json (rank 0 was
killed) or the job's outcome differs from rank 0's, the launcher records it.

How the workers tell the launcher: the launcher makes a private temporary folder and passes its path in
``$SHARDTUNE_LAUNCHER_NOTES``; each worker writes ``rank<R>.json`` (status, line, whether it recorded run.json's
outcome) when it ends, and rank 0 writes ``run_file.json`` (where run.json is) as soon as it claims the output
folder. Written atomically, read once after the workers are gone. torchelastic's error files were the other
candidate, but they exist only for a failure that escapes as an exception (``@record``), hold a traceback rather
than a line, and have nothing to say about a preemption, a usage error's status, or a worker killed before it
could write anything; a note per rank covers every ending and keeps the exit status the worker chose. A worker
killed without a note is named from torchrun's own record of its exit (signal or status).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from shardtune.cli import Ending, _say, _wants_debug, wants_help
from shardtune.errors import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, ConfigError
from shardtune.model_checkpointing.output_dir import record_outcome_at
from shardtune.utils.distributed import LAUNCHER_NOTES_ENV

WORKER_MODULE = "shardtune.cli"  # python -m shardtune.cli: one worker
# torchrun options that choose the worker's command: `shardtune run` always runs shardtune's own
NOT_HERE = ("-m", "--module", "--no_python", "--no-python", "--run_path", "--run-path")
# torchelastic's loggers whose warnings and errors make up torchrun's failure report (shown with --debug)
REPORT_LOGGERS = ("torch.distributed.elastic",)

DESCRIPTION = """\
shardtune run: start shardtune's finetuning in several processes with torchrun's launcher (torch.distributed.run)
and return the workers' exit status: 0 completed, 1 failed, 2 usage error, 75 preempted (rerun with
--resume_from auto). Launcher options are torchrun's (below); the finetuning flags follow them
(`shardtune --help` lists those). Example:

    shardtune run --nproc_per_node 8 --enable_fsdp --model_name meta-llama/Llama-3.1-8B --output_dir out
"""


def _parser():
    parser = torchrun.get_args_parser()
    parser.prog, parser.description = "shardtune run", DESCRIPTION
    parser.usage = "shardtune run [launcher options] [finetuning flags]"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:  # the worker's command is shardtune's: hide the options that would choose it
        if action.dest in ("training_script", "training_script_args") or set(action.option_strings) & set(NOT_HERE):
            action.help = argparse.SUPPRESS

    def error(message: str):  # argparse prints its usage and exits 2; here: one line, as for every usage error
        raise ConfigError(f"shardtune run: {message}")

    parser.error = error
    return parser


def split_argv(parser, argv: List[str]):
    """(launcher options, finetuning flags): the launcher's options run up to the first token that is none of
    them (no torchrun option shares a name with a finetuning flag)."""
    options = parser._option_string_actions  # every spelling of every option of torchrun's own parser
    i = 0
    while i < len(argv) and argv[i].partition("=")[0] in options:
        name, eq, _ = argv[i].partition("=")
        if name in NOT_HERE:
            raise ConfigError(f"shardtune run: {name} is not an option here (every worker runs shardtune's "
                              "finetuning; use torchrun to run another script)")
        i += 1 if eq or options[name].nargs == 0 else 2
    return argv[:i], argv[i:]


@dataclass(frozen=True)
class WorkerEnd:
    rank: int
    status: int
    line: str
    time: float
    outcome_recorded: bool = False
    ended_ranks: tuple = ()  # stopped peers it killed (utils/heartbeat.py)


def read_notes(folder: Path) -> Dict[int, WorkerEnd]:
    ends = {}
    for path in folder.glob("rank*.json"):
        note = json.loads(path.read_text())
        rank = int(path.stem[len("rank"):])
        ends[rank] = WorkerEnd(rank, note["status"], note["line"], note["time"], note["outcome_recorded"],
                               tuple(note["ended_ranks"]))
    return ends


def died(failures: dict, ends: Dict[int, WorkerEnd], expected: int) -> List[WorkerEnd]:
    """The workers that ended without a note: from torchrun's record of their exit where it has one. A stopped
    worker that a peer killed is no cause of its own: the peer's line names it."""
    gone, ended_by_peer = [], {r for e in ends.values() for r in e.ended_ranks}
    for rank, failure in sorted(failures.items()):
        if rank not in ends and rank not in ended_by_peer:
            how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                   else f"exited with status {failure.exitcode} without saying why")
            gone.append(WorkerEnd(rank, EXIT_FAILED, f"error: rank {rank} {how}", failure.timestamp))
    missing = expected - len(ends) - len(gone) - len(ended_by_peer)
    if missing > 0:  # torchrun had no record either (the launcher was signalled and SIGKILLed them)
        gone.append(WorkerEnd(-1, EXIT_FAILED, f"error: {missing} worker(s) ended without a status (killed?)",
                              float("inf")))
    return gone


def job_ending(ends: Dict[int, WorkerEnd], gone: List[WorkerEnd]) -> Ending:
    """The job's status and line from its workers' (module docstring)."""
    by_rank = [ends[r] for r in sorted(ends)]
    usage = [e for e in by_rank if e.status == EXIT_USAGE]
    if usage:
        return Ending(EXIT_USAGE, usage[0].line)
    if not gone and by_rank and all(e.status == EXIT_PREEMPTED for e in by_rank):
        return Ending(EXIT_PREEMPTED, by_rank[0].line)
    if not gone and by_rank and all(e.status == EXIT_OK for e in by_rank):
        return Ending(EXIT_OK)
    failed = gone + [e for e in by_rank if e.status not in (EXIT_OK, EXIT_PREEMPTED)]
    first = min(failed, key=lambda e: e.time) if failed else WorkerEnd(-1, EXIT_FAILED, "error: no worker started", 0)
    return Ending(EXIT_FAILED, first.line)


def record_if_rank0_could_not(folder: Path, ends: Dict[int, WorkerEnd], ending: Ending) -> None:
    """run.json's outcome, when rank 0 (on this node) claimed the folder but did not record this job's outcome."""
    run_file = folder / "run_file.json"
    if not run_file.exists():
        return
    rank0 = ends.get(0)
    if rank0 is None or not rank0.outcome_recorded or Ending(rank0.status, rank0.line).outcome != ending.outcome:
        where = json.loads(run_file.read_text())
        record_outcome_at(Path(where["path"]), where["run_id"], ending.outcome)


def _quiet_torchelastic() -> None:
    """torchelastic sets a level on each of its loggers (so a parent's level does not reach them): set them all."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(REPORT_LOGGERS):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch_cli(argv: List[str]) -> int:
    """``shardtune run ...``: launch, wait, return the job's exit status (module docstring)."""
    parser = _parser()
    if wants_help(argv):
        print(parser.format_help(), flush=True)
        return EXIT_OK
    try:
        launcher_argv, flags = split_argv(parser, argv)
        args = parser.parse_args([*launcher_argv, WORKER_MODULE])
        expected = torchrun.determine_local_world_size(args.nproc_per_node)
        try:  # what torchrun would check only once it runs
            torchrun.parse_min_max_nnodes(args.nnodes)
        except ValueError:
            raise ConfigError(f"shardtune run: --nnodes {args.nnodes}: expected N or MIN:MAX") from None
        if args.max_restarts < 0:
            raise ConfigError(f"shardtune run: --max_restarts {args.max_restarts}: expected 0 or more")
    except (ConfigError, ValueError) as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    args.module, args.training_script_args = True, flags
    debug = _wants_debug(flags)
    if not debug:
        _quiet_torchelastic()
    folder = Path(tempfile.mkdtemp(prefix="shardtune-launch-"))
    os.environ[LAUNCHER_NOTES_ENV] = str(folder)
    failures = {}
    try:
        torchrun.run(args)
    except ChildFailedError as exc:  # torchrun's report of the workers that exited non-zero
        failures = exc.failures
        if debug:
            print(exc.format_msg(), file=sys.stderr, flush=True)
    except SignalException:  # the launcher was asked to stop: torchrun forwarded the signal and waited for the workers
        pass
    try:
        ends = read_notes(folder)
        ending = job_ending(ends, died(failures, ends, expected))
        record_if_rank0_could_not(folder, ends, ending)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if ending.line:
        _say(ending.line)
    return ending.status
