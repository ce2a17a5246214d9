"""``python -m shardtune [run] ...``: the same as the ``shardtune`` console script (shardtune/cli.py)."""
import sys

from shardtune.cli import entry

sys.exit(entry())
