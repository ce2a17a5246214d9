"""Naming the rank that stopped answering when a collective times out.

A collective that times out only tells the ranks waiting in it *that* it timed out, not who is missing.
So every rank runs a tiny daemon thread that stamps the time into the rendezvous store (the launcher's
or rank 0's TCPStore) once per second. A stopped process (SIGSTOP, a frozen node) stamps no more, while
a rank blocked inside a collective keeps stamping (the wait releases the GIL). When a collective times
out, the waiting ranks read the stamps and report the ranks that went silent.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from typing import Optional

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
        self.store.set(KEY.format(rank=self.rank), repr(time.time()))

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
            for rank in range(self.world_size):
                key = KEY.format(rank=rank)
                last = float(self.store.get(key)) if self.store.check([key]) else None
                if last is None or now - last > SILENT_AFTER_S:
                    silent.append(f"rank {rank} stopped answering" + (f" (silent for {now - last:.0f} s)"
                                                                      if last is not None else ""))
        except Exception:  # noqa: BLE001
            return "the rendezvous store (rank 0 or the launcher) is not answering either: rank 0 may have stopped"
        if not silent:
            return "every rank is alive, so one of them is busy outside the collective (slow I/O?)"
        return ", ".join(silent)


def is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return type(exc).__name__ == "DistBackendError" or "timed out" in text or "timeout" in text


def start(rank: int, world_size: int) -> Optional[Heartbeat]:
    try:
        return Heartbeat(rank, world_size)
    except Exception:  # noqa: BLE001 - no store to reach (an unusual init method): just no names on timeout
        return None
