"""Where the files that ship inside the package live.

The embedded default run (``python finetuning.py`` with no arguments) uses these, so it needs
neither the network nor any file outside the package.
"""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODEL_DIR = ASSETS_DIR / "tiny-llama"
BUNDLED_ALPACA_SAMPLE = ASSETS_DIR / "alpaca_sample" / "alpaca_sample.json"
