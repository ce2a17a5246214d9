"""The errors a run can end with, and the exit status each one means. A leaf: every module may import it.

Exit status is a promise (README, "Configuration"): 0 only when what was asked was done and saved; otherwise the
status says what happened and one line says what to do.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1      # the run failed: fix the cause, then rerun (or resume)
EXIT_USAGE = 2       # bad input, found before anything was trained or written: fix the flag or file
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped on request after a checkpoint; rerun with --resume_from auto


class ConfigError(ValueError):
    """A user error in flags, config files, model or data files. The message is one line meant for the terminal."""


class SaveError(RuntimeError):
    """A written model, adapter or checkpoint does not hold what was trained (or could not be written)."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite, or the loss diverged: the run is not a result."""


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (or its type when it has none): what a one-line error quotes."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
