"""Plot a metrics file: ``python -m shardtune.observability.plots output/metrics.jsonl [--out_dir D]``.

Writes PNGs next to the file (or into --out_dir), named after it:

* ``<stem>_loss_by_step.png`` / ``<stem>_perplexity_by_step.png``: train value of every optimizer step,
  eval value at the step where each epoch's evaluation ran;
* ``<stem>_loss_by_epoch.png`` / ``<stem>_perplexity_by_epoch.png``: train vs eval per epoch;
* ``<stem>_throughput_by_step.png``: tokens/s per GPU and MFU (or TFLOP/s) when the file has them.

Reads shardtune's JSONL (``--save_metrics``) and, for old runs, the reference's metrics_data_*.json
(``--file_path`` is accepted as in the reference). A step logged twice (a resumed run repeats the steps
after its checkpoint) keeps its latest value. matplotlib is an optional dependency
(``pip install 'shardtune[tracking]'``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from shardtune.observability.metrics import perplexity

INSTALL = "pip install 'shardtune[tracking]'"


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
            raise SystemExit(f"plots: {path}:{n} is not a JSON line") from None
        if rec.get("kind") == "train_step":
            steps[int(rec["step"])] = rec
        elif rec.get("kind") == "epoch":
            epochs[int(rec["epoch"])] = rec
    return {"step": steps, "epoch": epochs}


def _finite(values: List[Optional[float]]) -> List[float]:
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def plot(path, out_dir=None) -> List[Path]:
    """Write the PNGs; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"plots needs matplotlib, which is not installed: {INSTALL}") from None

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"plots: no such file: {path}")
    out_dir = Path(out_dir) if out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    series = load_series(path)
    steps = sorted(series["step"].values(), key=lambda r: r["step"])
    epochs = sorted(series["epoch"].values(), key=lambda r: r["epoch"])
    if not steps and not epochs:
        raise SystemExit(f"plots: {path} holds no train_step or epoch records")
    written: List[Path] = []

    def save(fig, name: str) -> None:
        target = out_dir / f"{path.stem}_{name}.png"
        fig.tight_layout()
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)

    for metric, label in (("loss", "loss"), ("perplexity", "perplexity")):
        if steps:
            fig, ax = plt.subplots(figsize=(8, 4.5))
            ax.plot([r["step"] for r in steps], _finite([r.get(metric) for r in steps]), label=f"train {label}",
                    color="tab:blue", linewidth=1.2)
            evals = [(r["step"], r[f"eval_{metric}"]) for r in epochs
                     if r.get(f"eval_{metric}") is not None and r.get("step") is not None]
            if evals:
                ax.plot([s for s, _ in evals], _finite([v for _, v in evals]), "o--", color="tab:orange",
                        label=f"eval {label} (end of epoch)")
            ax.set(xlabel="optimizer step", ylabel=label, title=f"{label} by step")
            if metric == "perplexity":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
            save(fig, f"{metric}_by_step")
        if epochs:
            fig, ax = plt.subplots(figsize=(8, 4.5))
            xs = [r["epoch"] + 1 for r in epochs]
            ax.plot(xs, _finite([r.get(f"train_{metric}") for r in epochs]), "o-", label=f"train {label}",
                    color="tab:blue")
            if any(r.get(f"eval_{metric}") is not None for r in epochs):
                ax.plot(xs, _finite([r.get(f"eval_{metric}") for r in epochs]), "s-", label=f"eval {label}",
                        color="tab:orange")
            ax.set(xlabel="epoch", ylabel=label, title=f"train and eval {label} by epoch")
            ax.set_xticks(xs)
            if metric == "perplexity":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
            save(fig, f"{metric}_by_epoch")

    if steps and any(r.get("tokens_per_s") is not None for r in steps):
        # two panels sharing the step axis: at a fixed sequence length MFU is proportional to tokens/s, so
        # one twin-axis plot would draw one line over the other
        key, label, scale = (("mfu", "MFU (%)", 100.0) if any(r.get("mfu") is not None for r in steps)
                             else ("tflops", "TFLOP/s per GPU", 1.0))
        has_second = any(r.get(key) is not None for r in steps)
        fig, axes = plt.subplots(2 if has_second else 1, 1, figsize=(8, 6 if has_second else 4.5), sharex=True,
                                 squeeze=False)
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
    for p in plot(path, args.out_dir):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
