"""Plot a metrics file: ``python -m shardtune.observability.plots output/metrics.jsonl [--out_dir D]``.

Writes PNGs next to the file (or into --out_dir), named after it:

* ``<stem>_loss_by_step.png`` / ``<stem>_perplexity_by_step.png``: train value of every optimizer step,
  eval value at the step where each epoch's evaluation ran;
* ``<stem>_loss_by_epoch.png`` / ``<stem>_perplexity_by_epoch.png``: train vs eval per epoch;
* ``<stem>_throughput_by_step.png``: tokens/s per GPU and MFU (or TFLOP/s) when the file has them;
* ``<stem>_lr_by_step.png``: the learning rate of every optimizer step;
* ``<stem>_memory_by_step.png``: peak memory per step (GB; device peak on GPUs, host RSS on CPU) and, on GPUs,
  the caching allocator's peak reservation.

Every run refreshes these in ``<output_dir>/plots/`` at each evaluation and at its end (observability/trackers.py,
PlotsTracker); the figures are small so that a refresh stays cheap.

Reads shardtune's JSONL (``--save_metrics``) and, for old runs, the reference's metrics_data_*.json
(``--file_path`` is accepted as in the reference). A step logged twice (a resumed run repeats the steps
after its checkpoint) keeps its latest value. matplotlib is an optional dependency
(``pip install 'shardtune[tracking]'``); without it the command prints one ``error:`` line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from shardtune.errors import EXIT_USAGE, ConfigError
from shardtune.observability.metrics import perplexity

INSTALL = "pip install 'shardtune[tracking]'"
FIGSIZE = (6.4, 3.6)  # inches; at DPI a PNG of about 30 kB: cheap to write at every evaluation
DPI = 90
MARGINS = dict(left=0.16, right=0.97, bottom=0.14, top=0.9, hspace=0.3)  # room for the tick and axis labels


class MatplotlibMissing(ConfigError):
    """matplotlib (the tracking extra) is not installed."""


def load_series(path: Path) -> Dict[str, dict]:
    """{"step": {step: record}, "epoch": {epoch: record}} from a JSONL file or a reference JSON file."""
    text = Path(path).read_text(encoding="utf-8")
    steps: Dict[int, dict] = {}
    epochs: Dict[int, dict] = {}
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n{" not in stripped.strip() and '"train_step_loss"' in stripped:
        ref = json.loads(stripped)  # the reference's single JSON object of lists
        for i, loss in enumerate(ref.get("train_step_loss", [])):
            steps[i + 1] = {"step": i + 1, "loss": loss, "perplexity": perplexity(loss)}
        evals = ref.get("val_epoch_loss", [])
        for e, loss in enumerate(ref.get("train_epoch_loss", [])):
            rec = {"epoch": e, "train_loss": loss, "train_perplexity": perplexity(loss)}
            if e < len(evals):
                rec.update(eval_loss=evals[e], eval_perplexity=perplexity(evals[e]))
            epochs[e] = rec
        return {"step": steps, "epoch": epochs}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"plots: {path}:{n} is not a JSON line") from None
        if rec.get("kind") == "train_step":
            steps[int(rec["step"])] = rec
        elif rec.get("kind") == "epoch":
            epochs[int(rec["epoch"])] = rec
    return {"step": steps, "epoch": epochs}


def _finite(values: List[Optional[float]]) -> List[float]:
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def _log_scale(ax) -> None:
    """A log y axis where the axes hold a positive value (matplotlib refuses one with none)."""
    if any(v > 0 for line in ax.get_lines() for v in line.get_ydata() if math.isfinite(v)):
        ax.set_yscale("log")


def plot(path, out_dir=None) -> List[Path]:
    """Write the PNGs; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MatplotlibMissing(f"plots need matplotlib, which is not installed: {INSTALL}") from None

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plots: no such file: {path}")
    out_dir = Path(out_dir) if out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    series = load_series(path)
    steps = sorted(series["step"].values(), key=lambda r: r["step"])
    epochs = sorted(series["epoch"].values(), key=lambda r: r["epoch"])
    if not steps and not epochs:
        raise ConfigError(f"plots: {path} holds no train_step or epoch records")
    written: List[Path] = []

    def save(fig, name: str) -> None:
        target = out_dir / f"{path.stem}_{name}.png"
        fig.subplots_adjust(**MARGINS)  # fixed: tight_layout would draw each figure twice (half the cost)
        fig.savefig(target, dpi=DPI)
        plt.close(fig)
        written.append(target)

    for metric, label in (("loss", "loss"), ("perplexity", "perplexity")):
        if steps:
            fig, ax = plt.subplots(figsize=FIGSIZE)
            ax.plot([r["step"] for r in steps], _finite([r.get(metric) for r in steps]), label=f"train {label}",
                    color="tab:blue", linewidth=1.2)
            evals = [(r["step"], r[f"eval_{metric}"]) for r in epochs
                     if r.get(f"eval_{metric}") is not None and r.get("step") is not None]
            if evals:
                ax.plot([s for s, _ in evals], _finite([v for _, v in evals]), "o--", color="tab:orange",
                        label=f"eval {label} (end of epoch)")
            ax.set(xlabel="optimizer step", ylabel=label, title=f"{label} by step")
            if metric == "perplexity":
                _log_scale(ax)
            ax.grid(alpha=0.3)
            ax.legend()
            save(fig, f"{metric}_by_step")
        if epochs:
            fig, ax = plt.subplots(figsize=FIGSIZE)
            xs = [r["epoch"] + 1 for r in epochs]
            ax.plot(xs, _finite([r.get(f"train_{metric}") for r in epochs]), "o-", label=f"train {label}",
                    color="tab:blue")
            if any(r.get(f"eval_{metric}") is not None for r in epochs):
                ax.plot(xs, _finite([r.get(f"eval_{metric}") for r in epochs]), "s-", label=f"eval {label}",
                        color="tab:orange")
            ax.set(xlabel="epoch", ylabel=label, title=f"train and eval {label} by epoch")
            ax.set_xticks(xs)
            if metric == "perplexity":
                _log_scale(ax)
            ax.grid(alpha=0.3)
            ax.legend()
            save(fig, f"{metric}_by_epoch")

    if steps and any(r.get("tokens_per_s") is not None for r in steps):
        # two panels sharing the step axis: at a fixed sequence length MFU is proportional to tokens/s, so
        # one twin-axis plot would draw one line over the other
        key, label, scale = (("mfu", "MFU (%)", 100.0) if any(r.get("mfu") is not None for r in steps)
                             else ("tflops", "TFLOP/s per GPU", 1.0))
        has_second = any(r.get(key) is not None for r in steps)
        fig, axes = plt.subplots(2 if has_second else 1, 1, sharex=True, squeeze=False,
                                 figsize=(FIGSIZE[0], FIGSIZE[1] * (1.5 if has_second else 1)))
        xs = [r["step"] for r in steps]
        top = axes[0][0]
        top.plot(xs, _finite([r.get("tokens_per_s") for r in steps]), color="tab:green", linewidth=1.0)
        top.set(ylabel="input tokens/s per GPU", title="throughput by step")
        top.grid(alpha=0.3)
        if has_second:
            bottom = axes[1][0]
            bottom.plot(xs, _finite([None if r.get(key) is None else r[key] * scale for r in steps]),
                        color="tab:red", linewidth=1.0)
            bottom.set(ylabel=label)
            bottom.grid(alpha=0.3)
        axes[-1][0].set_xlabel("optimizer step")
        save(fig, "throughput_by_step")

    for name, title, lines in (
            ("lr", "learning rate by step", (("lr", "learning rate", "tab:purple"),)),
            ("memory", "peak memory by step", (("peak_mem_gb", "peak memory (GB)", "tab:brown"),
                                               ("peak_reserved_gb", "peak reserved, GPU (GB)", "tab:gray")))):
        drawn = [(key, label, color) for key, label, color in lines if any(r.get(key) is not None for r in steps)]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=FIGSIZE)
        for key, label, color in drawn:
            ax.plot([r["step"] for r in steps], _finite([r.get(key) for r in steps]), label=label, color=color,
                    linewidth=1.2)
        ax.set(xlabel="optimizer step", ylabel=drawn[0][1] if len(drawn) == 1 else "GB", title=title)
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend()
        save(fig, f"{name}_by_step")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardtune.observability.plots",
                                     description="Plot loss and perplexity curves from a --save_metrics file.")
    parser.add_argument("file", nargs="?", help="metrics .jsonl (or the reference's metrics_data_*.json)")
    parser.add_argument("--file_path", help="same as FILE (the reference's flag)")
    parser.add_argument("--out_dir", help="where the PNGs go (default: next to the file)")
    args = parser.parse_args(argv)
    path = args.file or args.file_path
    if not path:
        parser.error("give the metrics file")
    try:
        written = plot(path, args.out_dir)
    except ConfigError as exc:  # one line, no traceback: a missing extra or a bad file is fixed by the user
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
