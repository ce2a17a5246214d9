"""Stopping cleanly when the scheduler says so (SIGTERM from Slurm or Kubernetes before preemption, SIGINT
from Ctrl-C): finish the optimizer step in progress, write a resumable checkpoint, exit with
:data:`shardtune.errors.EXIT_PREEMPTED` (75) and one line saying how to resume.

The signal handler only records the signal. Once per optimizer step every rank contributes its flag to one
tiny all-reduce (MAX), so all ranks agree to stop after the *same* step even when the signal reaches them
at different times, or reaches only some of them. A second signal stops at once (the default action).

Under torchrun a SIGTERM to the launcher is forwarded to every worker, which then has torchrun's grace
period (30 s) to finish its step and save before the launcher sends SIGKILL. Slurm signals the launcher and the
workers alike, so a worker sees the forwarded copy too: a second signal within DUPLICATE_WINDOW_S of the first is
that copy, not a second request.

A launcher that dies without a word (``kill -9``, an OOM kill) leaves its workers training on, with nobody to
collect their status. :func:`stop_when_launcher_dies` turns its death into the same agreed stop, recorded as
LAUNCHER_DIED, and bounds it: the agreement is a collective, and a peer that is gone or stopped too would keep
it waiting, so after the launcher's usual grace the worker gives up and exits 1.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

from shardtune.errors import EXIT_FAILED
from shardtune.utils import distributed
from shardtune.utils.logging import log
from shardtune.utils.signals import STOP_SIGNALS, watch_parent

DUPLICATE_WINDOW_S = 1.0
LAUNCHER_DIED = int(signal.SIGHUP)  # the stop's reason when the launcher died (SIGHUP: "the parent hung up")
# How long a worker whose launcher died may take to finish its step and checkpoint: torchrun's shutdown grace.
GIVE_UP_AFTER_S = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)

_active: Optional["StopRequest"] = None  # the request installed now (the training loop's), if any
_trained = False  # a request was installed and has been left: the run is past training (saving, exporting, ending)


def _reason(signum: int) -> str:
    return "the launcher's death" if signum == LAUNCHER_DIED else signal.Signals(signum).name


class Preempted(Exception):
    """Raised by the training loop once the checkpoint of the last finished step is written."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint (saving is off)"
        super().__init__(f"stopped by {_reason(signum)} after step {step}: {where}; to continue, rerun the same "
                         "command with --resume_from auto")


class StopRequest:
    """Records SIGTERM / SIGINT while installed (a context manager), and turns it into an agreed stop."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        self._signalled_at = None  # monotonic time of the first signal

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self._signalled_at is not None:
            if now - self._signalled_at < DUPLICATE_WINDOW_S:
                return  # the launcher's forwarded copy of the signal this process got itself
            self.__exit__()  # asked twice: stop now, as if no handler were installed
            signal.raise_signal(signum)
            return
        self._signalled_at = now
        self.ask(signum)  # nothing else here: printing inside a signal handler can collide with a print

    def ask(self, reason: int) -> None:
        """Ask for a stop after the step in progress (a signal number, or LAUNCHER_DIED); the first reason stays."""
        self.signum = self.signum or reason

    def __enter__(self) -> "StopRequest":
        global _active
        _active = self
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (main() called from a thread)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        global _active, _trained
        _active, _trained = None, True
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed_signal(self) -> int:
        """Collective, once per step: the signal any rank received (0: none), the same on every rank. Agreed in host
        memory (gloo), so the GPU's queue is not drained for it."""
        return distributed.agree(self.signum, op="max")

    def after_step(self, state, ctx, saved) -> None:
        """Called by the loop after every optimizer step; ``saved``: the folder of this step's checkpoint when it
        is written already (None: not yet). Raises :class:`Preempted` once the checkpoint is on disk."""
        signum = self.agreed_signal()
        if not signum:
            return
        why = "the launcher died" if signum == LAUNCHER_DIED else \
            f"{signal.Signals(signum).name} received (send the signal again to stop at once)"
        log(f"--> {why}: step {state.step} is done; saving a checkpoint")
        path = saved
        if path is None and ctx.save_checkpoint is not None:
            path = ctx.save_checkpoint(state, "preempt")  # on disk before the exit (never in the background)
        raise Preempted(signum, state.step, str(path) if path else None)


def stop_when_launcher_dies(give_up: Callable[[str], None]) -> None:
    """Watch the launcher (this process's parent); when it dies, ask the training loop to stop as on SIGTERM (all
    ranks agree, checkpoint, Preempted). A worker not training yet, or not done within GIVE_UP_AFTER_S, calls
    ``give_up(line)`` (report, one line) and exits 1 at once."""

    def launcher_died(pid: int) -> None:
        request, finishing = _active, _trained
        if request is not None:
            log(f"--> the launcher (pid {pid}) died: stopping after this step (a checkpoint), within "
                f"{GIVE_UP_AFTER_S:.0f} s")
            request.ask(LAUNCHER_DIED)
        if request is not None or finishing:
            # Training is stopping, or has stopped already (a peer noticed the death first and the agreed stop
            # is being written, or the run is exporting): the main thread ends the process meanwhile, normally
            # (this thread is a daemon).
            time.sleep(GIVE_UP_AFTER_S)
            give_up(f"the launcher (pid {pid}) died; stopped (the checkpoint did not finish in time)")
        else:
            give_up(f"the launcher (pid {pid}) died; stopped (nothing to save yet)")
        os._exit(EXIT_FAILED)

    watch_parent(launcher_died)
