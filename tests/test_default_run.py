"""The embedded default: `python finetuning.py` with no model or data flags, from the repository root."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import HANG_TIMEOUT_S

from shardtune.configs.paths import BUNDLED_MODEL_DIR
from shardtune.observability.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_default_run_trains_bundled_model_offline(tmp_path):
    """Runs in an empty working directory with the hub offline: needs nothing outside the package."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "finetuning.py"), "--save_metrics"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "output"
    saved = yaml.safe_load((out / "run_config.yaml").read_text())["train_config"]  # the demo's preset
    assert Path(saved["model_name"]) == BUNDLED_MODEL_DIR and saved["dataset"] == "alpaca_dataset"
    assert (saved["context_length"], saved["batch_size_training"], saved["num_epochs"]) == (512, 8, 2)
    assert "Training epoch" in proc.stderr  # the progress bar (tqdm writes to stderr)
    summary = json.loads((out / "summary.json").read_text())
    (metrics,) = out.glob("metrics_*.jsonl")
    records = read_metrics(metrics)
    steps = [r["loss"] for r in records if r["kind"] == "train_step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[1]["eval_loss"] < epochs[0]["eval_loss"]
    assert sum(steps[-10:]) / 10 < sum(steps[:10]) / 10 - 1.0, "the loss should fall visibly"
    assert summary["eval_loss"] == pytest.approx(epochs[1]["eval_loss"])
    assert (out / "model" / "model.safetensors").is_file() and len(list((out / "plots").glob("*.png"))) == 7
