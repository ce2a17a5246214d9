"""Printing with one owner: ``log`` prints on rank 0 only; ``log_all`` prefixes the rank."""
from __future__ import annotations

import sys

from shardtune.utils import distributed


def log(*parts) -> None:
    if distributed.is_main():
        print(*parts, flush=True)


def warn(msg: str) -> None:
    if distributed.is_main():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def log_all(*parts) -> None:
    print(f"[rank {distributed.info().rank}]", *parts, flush=True)
