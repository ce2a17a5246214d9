"""Naming the rank that stopped answering when a collective times out.

A collective that times out only tells the ranks waiting in it *that* it timed out, not who is missing.
So every rank runs a tiny daemon thread that stamps the time into the rendezvous store (the launcher's
or rank 0's TCPStore) once per second. A stopped process (SIGSTOP, a frozen node) stamps no more, while
a rank blocked inside a collective keeps stamping (the wait releases the GIL). When a collective times
out, the waiting ranks read the stamps and report the ranks that went silent.

A stamp also names the rank's host and pid, so that a rank that finds a silent peer *stopped* on its own host
(state T: SIGSTOP, a debugger) can end it with SIGKILL. Nothing else ends a stopped process: torchrun's agent
sends SIGTERM, which stays pending while the process is stopped, and SIGKILLs only after its 30 s shutdown grace,
so the job would outlive the timeout by those 30 s.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
import time
from typing import Dict, Optional, Tuple

import torch.distributed as dist

INTERVAL_S = 1.0
SILENT_AFTER_S = 3.0  # a rank silent for longer than this has stopped (stamps come every INTERVAL_S)
KEY = "shardtune_heartbeat/{rank}"


class Heartbeat:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        # Its own client connection, so that the stamps never wait behind the process group's store traffic.
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="shardtune-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.store.set(KEY.format(rank=self.rank), f"{time.time()!r} {os.getpid()} {socket.gethostname()}")

    def _stamps(self) -> Dict[int, Tuple[float, int, str]]:
        """rank -> (time of its last stamp, pid, host) for every rank that has stamped."""
        stamps = {}
        for rank in range(self.world_size):
            key = KEY.format(rank=rank)
            if self.store.check([key]):
                when, pid, host = self.store.get(key).decode().split(" ", 2)
                stamps[rank] = (float(when), int(pid), host)
        return stamps

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store is gone (shutdown): nothing left to report to
                return

    def stop(self) -> None:
        self._stop.set()

    def silent_ranks(self) -> str:
        """One phrase naming the ranks that stopped answering (read when a collective has timed out)."""
        now, silent = time.time(), []
        try:
            stamps = self._stamps()
            for rank in range(self.world_size):
                last = stamps[rank][0] if rank in stamps else None
                if last is None or now - last > SILENT_AFTER_S:
                    silent.append(f"rank {rank} stopped answering" + (f" (silent for {now - last:.0f} s)"
                                                                      if last is not None else ""))
        except Exception:  # noqa: BLE001
            return "the rendezvous store (rank 0 or the launcher) is not answering either: rank 0 may have stopped"
        if not silent:
            return "every rank is alive, so one of them is busy outside the collective (slow I/O?)"
        return ", ".join(silent)


    def stopped_local_ranks(self) -> Dict[int, int]:
        """rank -> pid of the silent ranks that are stopped processes on this host (module docstring)."""
        try:
            stamps = self._stamps()
        except Exception:  # noqa: BLE001 - no store: nothing known about the others
            return {}
        here, now = socket.gethostname(), time.time()
        return {rank: pid for rank, (last, pid, host) in stamps.items()
                if rank != self.rank and host == here and now - last > SILENT_AFTER_S and _is_stopped(pid)}


def kill(pids) -> None:
    """SIGKILL: the one signal a stopped process does not hold back."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _is_stopped(pid: int) -> bool:
    """Whether ``pid`` is a stopped process (state T or t in /proc; False where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return type(exc).__name__ == "DistBackendError" or "timed out" in text or "timeout" in text


def start(rank: int, world_size: int) -> Optional[Heartbeat]:
    try:
        return Heartbeat(rank, world_size)
    except Exception:  # noqa: BLE001 - no store to reach (an unusual init method): just no names on timeout
        return None
