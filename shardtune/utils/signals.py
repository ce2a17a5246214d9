"""The signals that ask a run to stop (SIGTERM from Slurm or Kubernetes before preemption, SIGINT from Ctrl-C),
and the one event that asks without a signal: the parent process (the launcher) dying."""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_POLL_S = 0.5  # how often the parent is looked at: a dead launcher is noticed within this


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Slurm signals every process of a job step and Ctrl-C the whole process
    group; workers must not die of it while the main process finishes its step (they end with it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def watch_parent(on_orphaned: Callable[[int], None]) -> threading.Thread:
    """Call ``on_orphaned(parent_pid)`` once, from a daemon thread, when this process's parent dies (the kernel
    then gives the process a new parent, so ``getppid()`` changes). A thread rather than PR_SET_PDEATHSIG: the
    kernel's signal would fire when the parent's forking *thread* ends, and the thread can decide what to do."""
    parent = os.getppid()

    def watch() -> None:
        stop = threading.Event()
        while os.getppid() == parent:
            stop.wait(PARENT_POLL_S)
        on_orphaned(parent)

    thread = threading.Thread(target=watch, name="shardtune-parent-watch", daemon=True)
    thread.start()
    return thread
