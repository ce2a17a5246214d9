"""The signals that ask a run to stop (SIGTERM from Slurm or Kubernetes before preemption, SIGINT from Ctrl-C)."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)



def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Slurm signals every process of a job step and Ctrl-C the whole process
    group; workers must not die of it while the main process finishes its step (they end with it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
