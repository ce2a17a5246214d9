"""Stopping cleanly when the scheduler says so (SIGTERM from Slurm or Kubernetes before preemption, SIGINT
from Ctrl-C): finish the optimizer step in progress, write a resumable checkpoint, exit with
:data:`shardtune.errors.EXIT_PREEMPTED` (75) and one line saying how to resume.

The signal handler only records the signal. Once per optimizer step every rank contributes its flag to one
tiny all-reduce (MAX), so all ranks agree to stop after the *same* step even when the signal reaches them
at different times, or reaches only some of them. A second signal stops at once (the default action).

Under torchrun a SIGTERM to the launcher is forwarded to every worker, which then has torchrun's grace
period (30 s) to finish its step and save before the launcher sends SIGKILL.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

from shardtune.utils import distributed
from shardtune.utils.logging import log
from shardtune.utils.signals import STOP_SIGNALS


class Preempted(Exception):
    """Raised by the training loop once the checkpoint of the last finished step is written."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint (saving is off)"
        super().__init__(f"stopped by {name} after step {step}: {where}; to continue, rerun the same command "
                         "with --resume_from auto")


class StopRequest:
    """Records SIGTERM / SIGINT while installed (a context manager), and turns it into an agreed stop."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:  # asked twice: stop now, as if no handler were installed
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum  # nothing else here: printing inside a signal handler can collide with a print

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (main() called from a thread)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
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
        log(f"--> {signal.Signals(signum).name} received: step {state.step} is done; saving a checkpoint "
            "(send the signal again to stop at once)")
        path = saved
        if path is None and ctx.save_checkpoint is not None:
            path = ctx.save_checkpoint(state, "step")
        raise Preempted(signum, state.step, str(path) if path else None)


