"""Repository-level promises: CI runs the README's test command; the console script works."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from conftest import HANG_TIMEOUT_S

REPO = Path(__file__).resolve().parent.parent


def _quickstart_commands() -> list:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quickstart_has_two_commands_and_ci_runs_the_test_one_verbatim():
    commands = _quickstart_commands()
    assert len(commands) == 2
    setup_and_run, setup_and_test = commands
    assert setup_and_run.endswith("python finetuning.py")
    assert "pytest" in setup_and_test and "torch==2.13.0" in setup_and_test
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert setup_and_test in ci_lines
    # what the README says CI sets around the command is what .ci/run sets
    readme = (REPO / "README.md").read_text()
    exports = [ln for ln in ci_lines if ln.startswith("export ")]
    assert exports and all(f"`{ln}`" in " ".join(readme.split()) for ln in exports)


def test_console_script_prints_help():
    exe = shutil.which("shardtune")
    assert exe, "pip install -e . installs the 'shardtune' console script"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0 and "--model_name" in proc.stdout and "fsdp_config:" in proc.stdout


def test_bundled_assets_carry_their_license():
    from shardtune.configs.paths import ASSETS_DIR, BUNDLED_ALPACA_SAMPLE, BUNDLED_MODEL_DIR

    assert (BUNDLED_ALPACA_SAMPLE.parent / "DATA_LICENSE").is_file()
    assert "CC BY-NC" in (BUNDLED_ALPACA_SAMPLE.parent / "PROVENANCE.txt").read_text()
    assert (BUNDLED_MODEL_DIR / "model.safetensors").is_file() and (BUNDLED_MODEL_DIR / "tokenizer.json").is_file()
    assert ASSETS_DIR.parent.name == "shardtune"
