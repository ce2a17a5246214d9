"""Host memory per rank while a run loads and shards its model, on CPU, against what `shardtune plan` says.

    python benchmarks/host_memory_slice.py --layers 1,2 [--hidden 8192 --intermediate 28672 --heads 64
        --kv_heads 8 --vocab 128256] [--tied] [--modes low_cpu,without] [--dir /tmp/slice]

For each layer count: a Llama of that width with random bf16 weights is saved to a temporary folder; then, for each
mode (with and without --low_cpu_fsdp), 2 gloo ranks under torchrun run the run's own loading and sharding
(models/builder.build_model, policies/fsdp.shard_model, with --enable_fsdp --fsdp_config.pure_bf16) and report
their peak resident memory (VmHWM). Beside it: the plan's figure for a GPU run, and that figure plus what a CPU run
keeps in host memory on top (its own parameter shard, which a GPU run keeps on the GPU, and without
--low_cpu_fsdp the whole checkpoint, which stays mapped on CPU because no unit moves to a GPU). Results in
docs/planning.md. One 70B-wide layer is 1.7 GB in bf16, the embedding and output layer 2.1 GB each: check
`free -g` first (2 layers take about 15 GB without --low_cpu_fsdp; --tied saves 2.1 GB per copy).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = {"low_cpu": ["--low_cpu_fsdp"], "without": []}
RUN_FLAGS = ["--enable_fsdp", "--fsdp_config.pure_bf16", "--batch_size_training", "1", "--context_length", "64"]


def make_model(folder: Path, layers: int, args) -> int:
    """A random bf16 Llama of the given width saved to ``folder``; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      tie_word_embeddings=args.tied, max_position_embeddings=8192, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    from shardtune.configs.paths import BUNDLED_MODEL_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL_DIR / name, folder / name)
    return sum(p.numel() for p in model.parameters())


def worker(model_dir: str, flags: list, out: str) -> None:
    """One rank (under torchrun): load and shard as a run does, then write its peak resident memory."""
    from shardtune.configs.parse import parse_cli
    from shardtune.models.builder import WeightSource, build_model
    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.observability.memory import host_peak_rss_bytes, host_rss_bytes
    from shardtune.planning.cli import split_flags
    from shardtune.planning.estimate import NO_TOKENIZER
    from shardtune.policies.fsdp import shard_model
    from shardtune.utils import distributed

    _, kwargs = split_flags(["--model_name", model_dir, *flags])
    run = parse_cli(kwargs)
    info = distributed.setup(True)
    before = host_rss_bytes()
    meta = run.train.low_cpu_fsdp and not info.is_main
    lm = build_model(run, WeightSource.for_run(run), "bf16_pure", info.device, NO_TOKENIZER, meta=meta)
    shard_model(CausalLMWithLoss(lm), run, info, "bf16_pure")
    Path(f"{out}.rank{info.rank}.json").write_text(json.dumps({"rank": info.rank, "base": before,
                                                               "peak": host_peak_rss_bytes()}))
    distributed.cleanup()


def largest_tensor(args) -> int:
    """Bytes of the largest weight (bf16): the embedding or a projection of the MLP."""
    return 2 * max(args.vocab * args.hidden, args.hidden * args.intermediate)


def cpu_expectation(ranks: list, mode: str, weights: int, shard: int, largest: int) -> tuple:
    """What a CPU run holds per rank (the plan's formula with the measured base and what stays on the host when no
    unit moves to a GPU): with --low_cpu_fsdp rank 0 the checkpoint and its shard, rank 1 its shard and one full
    tensor being received; without, every rank the checkpoint's mapped pages (sharding copies them unit by unit)."""
    base0, base1 = ranks[0]["base"], ranks[1]["base"]
    if mode == "low_cpu":
        return base0 + weights + shard, base1 + shard + largest
    return base0 + weights, base1 + weights


def measure(model_dir: Path, mode: str, work: Path) -> list:
    out = work / f"{model_dir.name}_{mode}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(29500 + os.getpid() % 1000), __file__, "--worker", str(model_dir), str(out), "--",
                    *RUN_FLAGS, *MODES[mode]], check=True, env=env, cwd=REPO)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def planned(model_dir: Path, mode: str) -> dict:
    from shardtune.planning.cli import split_flags
    from shardtune.planning.estimate import Cluster, plan_run

    _, kwargs = split_flags(["--model_name", str(model_dir), *RUN_FLAGS, *MODES[mode]])
    plan = plan_run(kwargs, Cluster(gpus=2))
    host = plan.host_low_cpu if mode == "low_cpu" else plan.host_without
    return {"rank0": host.rank0, "other": host.other_ranks}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2], sys.argv[5:], sys.argv[3])
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="1,2")
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--modes", default="low_cpu,without")
    ap.add_argument("--dir", default=None, help="where the models go (default: a temporary folder, removed)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    from shardtune.observability.memory import GB

    work = Path(args.dir or tempfile.mkdtemp(prefix="host_slice_"))
    rows = []
    try:
        print("| layers | parameters | mode | rank 0: measured / CPU expectation / plan for GPUs | rank 1: measured / "
              "CPU expectation / plan for GPUs | base RSS |\n|---|---|---|---|---|---|", flush=True)
        for layers in [int(x) for x in args.layers.split(",")]:
            folder = work / f"layers{layers}"
            n = make_model(folder, layers, args)
            weights, shard = 2 * n, n  # bf16 bytes: the checkpoint, and half of it (each rank's shard)
            for mode in args.modes.split(","):
                ranks, plan = measure(folder, mode, work), planned(folder, mode)
                cpu0, cpu1 = cpu_expectation(ranks, mode, weights, shard, largest_tensor(args))
                row = {"layers": layers, "parameters": n, "mode": mode, "measured": [r["peak"] for r in ranks],
                       "base": [r["base"] for r in ranks], "plan": plan, "plan_cpu": [cpu0, cpu1]}
                rows.append(row)
                print(f"| {layers} | {n / 1e9:.2f}B | {mode} | {ranks[0]['peak'] / GB:.1f} / {cpu0 / GB:.1f} / "
                      f"{plan['rank0'] / GB:.1f} GB | {ranks[1]['peak'] / GB:.1f} / {cpu1 / GB:.1f} / "
                      f"{plan['other'] / GB:.1f} GB | {ranks[0]['base'] / GB:.1f} GB |", flush=True)
            shutil.rmtree(folder)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
