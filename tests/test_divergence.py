"""A run whose loss diverges while staying finite ends with exit status 1 and one line, saving nothing after the
divergence; a healthy run is untouched by the check. Real runs of ``python finetuning.py`` on the bundled demo
model and data (each in a fresh process, tests/fresh_cli.py), on CPU."""
from __future__ import annotations

import os

import pytest
from fresh_cli import FreshCli

from shardtune.configs.parse import parse_cli
from shardtune.errors import ConfigError
from shardtune.observability.metrics import read_metrics

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="2")


@pytest.fixture(scope="module")
def cli():
    server = FreshCli(ENV)
    yield server
    server.close()


def _demo(cli, tmp_path, *flags):
    """The demo run (no --model_name: the bundled tiny Llama, 512-token blocks, lr 1e-3) with ``flags``."""
    out = tmp_path / "out"
    rc, stdout, stderr = cli.run(["--output_dir", out, "--save_metrics", "True", *flags], tmp_path, tmp_path)
    losses = [r["loss"] for r in sorted(read_metrics(out, "train_step"), key=lambda r: r["step"])]
    return rc, stderr, out, losses


def _assert_nothing_saved(out):
    assert not (out / "model").exists(), "a diverged run exported a model"
    checkpoints = out / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.rglob("state.json")), "a diverged run wrote a checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16_mixed", "bf16_pure"])
def test_lr_1_stops_as_diverged_and_saves_nothing(precision, cli, tmp_path):
    """--lr 1 sends the demo's loss from 7.65 to about 60 in one step (and on to 140 by the end, finite all the
    way: without the check the run exited 0 with its model saved). The smoothed loss passes 3x the start within a
    few steps, long before the first epoch's end (67 steps) would export a model."""
    rc, stderr, out, losses = _demo(cli, tmp_path, "--precision", precision, "--lr", "1")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 1, stderr[-3000:]
    assert len(errors) == 1 and "diverged" in errors[0] and "--lr" in errors[0], errors
    assert "Traceback" not in stderr
    assert 2 <= len(losses) <= 10, losses  # stopped within a few steps: what was logged is all that happened
    assert max(losses) > 3 * losses[0]
    _assert_nothing_saved(out)


@pytest.mark.slow
def test_a_loss_that_stops_falling_ends_the_run_after_the_patience(cli, tmp_path):
    """With the factor off, --divergence_patience_steps 3 stops the same run once its smoothed loss has not fallen
    below its best (the first step's) for 3 steps."""
    rc, stderr, out, losses = _demo(cli, tmp_path, "--precision", "bf16_mixed", "--lr", "1",
                                    "--divergence_factor", "0", "--divergence_patience_steps", "3")
    assert rc == 1, stderr[-3000:]
    (error,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "diverged" in error and "--divergence_patience_steps 3" in error
    assert len(losses) == 4, losses  # best at step 1, then steps 2, 3, 4 without a new best
    _assert_nothing_saved(out)


@pytest.mark.slow
def test_a_healthy_run_with_the_default_settings_is_untouched(cli, tmp_path):
    """The demo at its own settings (lr 1e-3, default divergence settings): its loss only falls, so it ends with
    status 0 and its model. The smoothed loss is an average of step losses, so it never exceeds the largest one:
    every step below the first step's loss leaves the default factor 3 a margin of 3x."""
    rc, stderr, out, losses = _demo(cli, tmp_path, "--max_train_step", "12", "--max_eval_step", "2")
    assert rc == 0, stderr[-3000:]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    assert max(losses) <= losses[0], losses
    assert (out / "model" / "model.safetensors").is_file()


def test_a_factor_that_would_stop_every_run_is_refused():
    with pytest.raises(ConfigError, match="--divergence_factor: must be 0 .off. or greater than 1"):
        parse_cli({"divergence_factor": 0.5})
    assert parse_cli({"divergence_factor": 0}).train.divergence_factor == 0
