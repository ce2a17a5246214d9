"""The ``shardtune`` console script (and ``python -m shardtune``): one word picks the command.

* ``shardtune run [launcher options] [finetuning flags]``: several processes (shardtune/launch.py);
* ``shardtune [finetuning flags]``: one process (shardtune/cli.py), the same as ``python finetuning.py``.

Room for more commands beside ``run`` (``shardtune plan``). It sits above cli.py and launch.py (the launcher
itself uses cli.py's one-line reporting), so that neither imports the other both ways.
"""
from __future__ import annotations

import sys

from shardtune.cli import cli
from shardtune.launch import launch_cli
from shardtune.planning.cli import plan_cli

COMMANDS = {"run": launch_cli, "plan": plan_cli}


def entry(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return cli(argv)
