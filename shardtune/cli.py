"""One process's command line: ``python finetuning.py ...`` or ``shardtune [finetuning flags]`` (shardtune/commands.py),
one process alone or one worker under torchrun / ``shardtune run`` (shardtune/launch.py).

:func:`cli` turns how the run ended into an exit status and one line (``error: ...`` or the preemption line), with
no traceback unless ``--debug``: a ConfigError exits 2 (printed once, by rank 0), a stop on request 75, divergence
and every other error 1. It also records the outcome in run.json (rank 0) and, under ``shardtune run``, tells the
launcher (which then prints the line, once).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import transformers

from shardtune.errors import (EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, ConfigError, SaveError,
                              TrainingDiverged, first_line)
from shardtune.finetuning import main
from shardtune.model_checkpointing.output_dir import forget_claim, record_outcome
from shardtune.training import preemption
from shardtune.training.preemption import Preempted
from shardtune.utils import distributed
from shardtune.utils.logging import warn

RANK0_FIRST_S = 2.0  # how long other ranks wait before exiting on a config error (rank 0 prints it)
_LAUNCHER_PID = os.getppid()  # under `shardtune run`: the launcher, which prints the line while it lives


def _run_without_result(*positional, **kwargs) -> None:
    if positional:  # fire would train first and only then complain about the leftover argument
        raise ConfigError(f"unexpected argument {positional[0]!r}: options are given as --name value (is a --flag "
                          "missing before it?); see --help")
    main(**kwargs)  # fire would print a returned dict


def _flag_names(argv) -> list:
    return [token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")]


def _wants_debug(argv) -> bool:
    """--debug, --debug True, --debug=1 (read before parsing, so that parse errors show a traceback too)."""
    for i, token in enumerate(argv):
        name, eq, value = token[2:].partition("=")
        if token.startswith("--") and name.replace("-", "_") in ("debug", "train_config.debug"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
            return value.strip().lower() in ("true", "1", "yes", "y", "on")
    return False


def _say(line: str) -> None:
    """The run's last line, on stderr and on a line of its own even when a progress bar is open."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def _help_topic(argv) -> Optional[str]:
    """``--help fsdp_config`` / ``--help=fsdp_config``: the config to show alone (None: everything)."""
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        if name in ("-h", "--help", "-help"):
            if eq:
                return value
            return argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
    return None


def wants_help(argv) -> bool:
    return any(a.partition("=")[0] in ("-h", "--help", "-help") for a in argv)


def _print_help(topic: Optional[str]) -> int:
    from shardtune.configs.help import format_help

    try:
        text = format_help(topic)
    except ConfigError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `--help | head`: the reader left; send the rest (and the exit flush) nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


@dataclass(frozen=True)
class Ending:
    """How a run ended: its exit status, its last line (printed by rank 0 only unless ``every_rank``) and the
    outcome run.json records. ``close`` leaves the process group the way this ending allows."""

    status: int
    line: str = ""
    every_rank: bool = False
    traced: bool = False  # --debug printed the traceback instead of the line
    ended_ranks: Tuple[int, ...] = ()  # stopped peers this rank ends (their death is no cause of its own)
    at: float = field(default_factory=time.time)
    close: Callable[[], None] = lambda: None

    @property
    def outcome(self) -> str:
        if self.status == EXIT_OK:
            return "completed"
        if self.status == EXIT_PREEMPTED:
            return "preempted"
        return "failed: " + self.line.removeprefix("error: ")


def _train(argv) -> Ending:
    """Run main() and map how it ended to an :class:`Ending` (the exception-to-exit-status mapping)."""
    import fire

    debug = _wants_debug(argv)
    try:
        fire.Fire(_run_without_result, command=argv, name="finetuning.py")
    except Preempted as stop:  # every rank agreed to stop after the same step and the checkpoint is written
        return Ending(EXIT_PREEMPTED, str(stop), close=distributed.cleanup)
    except ConfigError as exc:
        if debug:
            traceback.print_exc()
        elif not distributed.is_main():  # torchrun stops the other ranks as soon as one exits: let rank 0 print first
            time.sleep(RANK0_FIRST_S)
        # every rank meets the same bad input: rank 0 says it once
        return Ending(EXIT_USAGE, f"error: {exc}", traced=debug)
    except TrainingDiverged as exc:  # every rank saw the same global loss: say it once; nothing was saved
        return Ending(EXIT_FAILED, f"error: {exc}", close=distributed.abort)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - one line per rank (DCP raises BaseExceptions); traceback on request
        if debug:
            traceback.print_exc()
        where = f"[rank {distributed.info().rank}] " if distributed.info().world_size > 1 else ""
        first = first_line(exc)
        what = distributed.describe_timeout(exc) or (
            first if isinstance(exc, SaveError) else f"{type(exc).__name__}: {first} (--debug shows the traceback)")
        stopped = distributed.stopped_peers()  # ended once this rank's line is out (the launcher then stops it)
        return Ending(EXIT_FAILED, f"error: {where}{what}", every_rank=True, traced=debug, ended_ranks=tuple(stopped),
                      close=lambda: distributed.end_peers(stopped))
    return Ending(EXIT_OK)


def _finish(ending: Ending) -> None:
    """Record the outcome (rank 0, run.json), tell the launcher, print the line (the launcher prints it instead)."""
    recorded = record_outcome(ending.outcome)  # only in the process that claimed the output folder
    told = os.getppid() == _LAUNCHER_PID and distributed.tell_launcher(f"rank{distributed.env_rank()}.json", {
        "status": ending.status, "line": ending.line, "outcome_recorded": recorded, "time": ending.at,
        "ended_ranks": list(ending.ended_ranks)})
    if ending.line and not ending.traced and not told and (ending.every_rank or distributed.is_main()):
        _say(ending.line)


def _library_warnings_from_rank0_only() -> None:
    """Every rank runs the same code, so a library's warning (transformers' FutureWarnings, a model's generation
    config) would print once per rank: ranks other than 0 drop them (Python warnings and transformers' logger).
    shardtune's own warnings are rank 0's anyway (utils/logging.py); errors still print on every rank."""
    if distributed.env_rank() == 0:
        return
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()


def cli(argv=None) -> int:
    """Console entry of one process: ``--help [CONFIG]`` prints the usage and every config's fields (or one
    config's); otherwise train and return the exit status (module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        return _print_help(_help_topic(argv))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _library_warnings_from_rank0_only()
    names = _flag_names(argv)
    for name in sorted({n for n in names if names.count(n) > 1}):
        warn(f"--{name} is given {names.count(name)} times; the last value is used")
    distributed.forget_launcher_note(f"rank{distributed.env_rank()}.json")  # a restarted worker group's old one
    forget_claim()  # an earlier run in this process (main() called directly) is no business of this one
    if distributed.under_elastic_agent():  # torchrun or `shardtune run`: a dead launcher stops this worker

        def give_up(line: str) -> None:
            _finish(Ending(EXIT_FAILED, f"error: [rank {distributed.env_rank()}] {line}", every_rank=True))

        preemption.stop_when_launcher_dies(give_up)
    ending = _train(argv)
    _finish(ending)
    ending.close()
    return ending.status


if __name__ == "__main__":  # the worker command of `shardtune run` (python -m shardtune.cli FLAGS)
    sys.exit(cli())
