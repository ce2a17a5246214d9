"""``python -m shardtune [run] ...``: the same as the ``shardtune`` console script (shardtune/commands.py)."""
import sys

from shardtune.commands import entry

if __name__ == "__main__":
    sys.exit(entry())
