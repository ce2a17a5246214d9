"""What a run leaves behind (issue 29): the metrics file and its plots by default, a --help that fits the
terminal, library warnings once under torchrun. Real tiny runs on CPU, real files, real torchrun with gloo.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from test_observability import _tiny_alpaca

from shardtune.observability.metrics import MetricsWriter, read_metrics
from shardtune.observability.trackers import PlotsTracker

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = {"loss_by_step", "loss_by_epoch", "perplexity_by_step", "perplexity_by_epoch", "throughput_by_step",
         "lr_by_step", "memory_by_step"}


def _plot_names(folder: Path) -> set:
    return {p.stem.split("_", 2)[-1] for p in folder.glob("*.png")}


def _tiny_run(tiny_llama_dir, tmp_path, **flags):
    """A real run in this process (rank 0 of one); returns its summary, stdout, stderr and output_dir."""
    from shardtune.finetuning import main

    out, err = io.StringIO(), io.StringIO()
    args = dict(model_name=str(tiny_llama_dir), dataset="alpaca_dataset", data_path=_tiny_alpaca(tmp_path, 24),
                context_length=128, batch_size_training=2, output_dir=str(tmp_path / "out"), save_model=False)
    with redirect_stdout(out), redirect_stderr(err):
        summary = main(**{**args, **flags})
    return summary, out.getvalue(), err.getvalue(), tmp_path / "out"


# ---------------------------------------------------------------------------------------------
# 1. Metrics and plots by default
# ---------------------------------------------------------------------------------------------
def test_default_run_writes_metrics_and_plots(tiny_llama_dir, tmp_path):
    summary, _, _, out = _tiny_run(tiny_llama_dir, tmp_path, num_epochs=2)
    (metrics,) = out.glob("metrics_*.jsonl")
    assert len(read_metrics(metrics, "train_step")) == summary["steps"] and len(read_metrics(metrics, "epoch")) == 2
    assert _plot_names(out / "plots") == PLOTS
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.name.startswith(metrics.stem)


def test_save_metrics_false_leaves_no_metrics_or_plots(tiny_llama_dir, tmp_path):
    _tiny_run(tiny_llama_dir, tmp_path, num_epochs=1, max_train_step=1, save_metrics=False)
    out = tmp_path / "out"
    assert (out / "run.json").is_file()
    assert not list(out.glob("metrics_*.jsonl")) and not (out / "plots").exists()


def test_without_matplotlib_the_run_warns_once_and_goes_on(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, find_spec finds nothing
    summary, _, err, out = _tiny_run(tiny_llama_dir, tmp_path, num_epochs=2)
    assert summary["steps"] > 0 and (out / "summary.json").is_file()
    warnings = [ln for ln in err.splitlines() if "matplotlib" in ln]
    assert len(warnings) == 1 and "shardtune[tracking]" in warnings[0]
    assert list(out.glob("metrics_*.jsonl")) and not (out / "plots").exists()


def _records(writer: MetricsWriter, epoch: int, first_step: int) -> None:
    for step in (first_step, first_step + 1):
        writer.write("train_step", step=step, epoch=epoch, loss=2.0 / step, perplexity=1.0, lr=1e-3,
                     tokens_per_s=100.0, peak_mem_gb=0.5)
    writer.write("epoch", epoch=epoch, step=first_step + 1, train_loss=1.0, eval_loss=1.1)


def test_plots_redrawn_at_evaluations_but_not_twice_at_the_end(tmp_path):
    metrics, plots = tmp_path / "metrics_x.jsonl", tmp_path / "plots"
    writer = MetricsWriter(metrics, [PlotsTracker(metrics, plots, num_epochs=3, max_train_step=0)])
    _records(writer, 0, 1)
    assert _plot_names(plots) >= {"loss_by_step", "lr_by_step", "memory_by_step"}  # after the 1st evaluation
    for png in plots.glob("*.png"):
        png.unlink()
    _records(writer, 1, 3)
    assert len(list(plots.glob("*.png"))) > 0  # after the 2nd
    for png in plots.glob("*.png"):
        png.unlink()
    _records(writer, 2, 5)  # the last epoch: close follows and draws
    assert not list(plots.glob("*.png"))
    writer.close()
    assert _plot_names(plots) >= {"loss_by_step", "loss_by_epoch"}


def test_plots_cli_without_matplotlib_is_one_error_line(tmp_path):
    metrics = tmp_path / "metrics_x.jsonl"
    writer = MetricsWriter(metrics)
    _records(writer, 0, 1)
    writer.close()
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "
            "runpy.run_module('shardtune.observability.plots', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(metrics)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "shardtune[tracking]" in lines[0]


# ---------------------------------------------------------------------------------------------
# 2. --help fits the terminal
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [100, 80, 60])  # 60: the narrowest it wraps to (help.MIN_WIDTH)
def test_help_fits_the_width_without_breaking_intervals_or_abbreviations(width):
    from shardtune.configs.help import format_help
    from shardtune.configs.run import RunConfigs

    texts = [format_help(width=width)] + [format_help(name, width=width) for name in RunConfigs().by_name()]
    for text in texts:
        for line in text.splitlines():
            assert len(line) <= width, line
            words = line.split()
            # an interval opened on this line is closed on it: "[0," or "(0," never ends a line
            assert not (words and re.fullmatch(r"[\[(]-?[\w.]+,", words[-1])), line
            if line.endswith(" ..."):  # a cut description
                assert words[-2].rstrip(".,") not in ("e.g", "i.e", "cf", "vs"), line
    if width != 100:
        return
    # the rows that once cut before their range, or at "e.g", now end with the range or a whole word
    compact = texts[0]
    assert re.search(r"^  --context_length .* \[1, inf\)$", compact, re.M)
    assert not re.search(r"\be\.g\.?$", compact, re.M)


def test_help_width_follows_the_terminal_up_to_100(monkeypatch):
    from shardtune.configs.help import format_help, terminal_width

    for columns, expected in (("80", 80), ("250", 100)):
        monkeypatch.setenv("COLUMNS", columns)
        assert terminal_width() == expected
    monkeypatch.setenv("COLUMNS", "80")
    assert max(len(line) for line in format_help("train_config").splitlines()) <= 80


# ---------------------------------------------------------------------------------------------
# 3. Library warnings once, from rank 0
# ---------------------------------------------------------------------------------------------
def test_library_warning_printed_once_under_torchrun(tiny_llama_dir, tmp_path):
    """A model whose generation_config.json sets a sampling flag without sampling (as many hub checkpoints
    do): transformers warns about it while loading, on every rank that loads; the combined output has it once."""
    import shutil

    from conftest import HANG_TIMEOUT_S

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    gen = json.loads((model / "generation_config.json").read_text()) if (model / "generation_config.json").is_file() \
        else {}
    (model / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False, "temperature": 0.7}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SHARDTUNE_PG_TIMEOUT_S="600")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "finetuning.py"), "--enable_fsdp", "--model_name", model, "--output_dir", tmp_path / "out",
           "--context_length", "64", "--num_epochs", "1", "--max_train_step", "1", "--run_validation", "False",
           "--num_workers_dataloader", "0", "--precision", "fp32", "--save_model", "False"]
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=HANG_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert len(re.findall(r"generation flags are not valid", out)) == 1, out[-4000:]
