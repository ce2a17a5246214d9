"""FSDP run matrix on real GPUs: every sharding strategy, HSDP, precision mode, activation checkpointing,
PEFT method, checkpoint type, resume and low-CPU loading, each for a few steps of a 1B-class Llama.

    python benchmarks/fsdp_matrix.py --out $OUT                 # all GPUs of the machine (2 or 4 H100s)
    python benchmarks/fsdp_matrix.py --out $OUT --only full_shard,lora --steps 4

* The model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128,256,
  tied embeddings) built with ``from_config`` (random weights, seed 0) and saved in bf16 to --model_dir
  (default /tmp/fsdp_matrix/llama1b, outside $OUT) with the bundled tokenizer (its 2,048 ids are a
  subset of the vocabulary). Data: the bundled Alpaca sample packed into --context_length blocks.
* Each run is a real ``python -m torch.distributed.run --standalone --nproc_per_node N`` launch of this
  file in worker mode, which calls ``shardtune.finetuning.main`` and records, per rank, peak GPU memory
  (allocated and reserved) and peak host RSS (resource.getrusage); the step losses come from the run's
  metrics JSONL.
* Output: $OUT/fsdp_matrix.json (everything), $OUT/fsdp_matrix.md (one table plus checks: strategies
  agree, resume reproduces the uninterrupted losses, low_cpu_fsdp's RSS on rank 0 vs the others, the
  FULL_STATE_DICT folder and the converted sharded checkpoint load with plain transformers), and
  $OUT/runs/<name>/ (log, per-rank JSON, metrics). Checkpoints stay under /tmp (they are large).
* Time: about 20 s per launch on H100s, 17 launches; --time_budget_s (default 420) skips what is left.

Needs torch, transformers, peft, fire, datasets on the device (see README); no network.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------
# Worker mode: one rank of one run (launched by torchrun)
# ---------------------------------------------------------------------------------------------
def worker(result_dir: Path, flags: list) -> None:
    import torch

    if len(flags) % 2:
        raise SystemExit(f"flags must be --key value pairs, got {flags}")
    kwargs = {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)}  # parse_cli converts types
    rank = int(os.environ.get("RANK", "0"))
    out = {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
    start = time.perf_counter()
    try:
        from shardtune.finetuning import main

        out["summary"] = main(**kwargs)
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised so torchrun reports it
        out["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        out["wall_s"] = time.perf_counter() - start
        out["host_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if torch.cuda.is_available():
            out["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            out["gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        result_dir.mkdir(parents=True, exist_ok=True)
        (result_dir / f"rank{rank}.json").write_text(json.dumps(out, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def build_model(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shardtune.configs.paths import BUNDLED_MODEL_DIR

    if (model_dir / "config.json").is_file():
        return
    t0 = time.time()
    cfg = LlamaConfig(**LLAMA_1B, max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (BUNDLED_MODEL_DIR / name).exists():
            shutil.copy(BUNDLED_MODEL_DIR / name, tmp / name)
    tmp.rename(model_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"--> built Llama-3.2-1B shape ({n / 1e9:.2f}B params) in {model_dir} in {time.time() - t0:.0f}s",
          flush=True)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def matrix(world: int, steps: int) -> list:
    """(name, flags, output folder shared with, notes). Flags on top of the common ones in run()."""
    half = steps // 2
    hsdp_shard = world // 2 if world >= 2 and world % 2 == 0 else world
    runs = [
        ("full_shard", {}, None, "baseline: FULL_SHARD, bf16_mixed, AC"),
        ("shard_grad_op", {"fsdp_config.sharding_strategy": "SHARD_GRAD_OP"}, None, ""),
        ("no_shard", {"fsdp_config.sharding_strategy": "NO_SHARD"}, None, "replicas (mesh world x 1)"),
        ("hybrid_node_mesh", {"fsdp_config.sharding_strategy": "HYBRID_SHARD"}, None,
         "HYBRID_SHARD without --hsdp: shard group = the node"),
        ("hsdp_explicit", {"fsdp_config.sharding_strategy": "HYBRID_SHARD", "fsdp_config.hsdp": True,
                           "sharding_group_size": hsdp_shard, "replica_group_size": world // hsdp_shard}, None,
         f"mesh ({world // hsdp_shard}, {hsdp_shard})"),
        ("fp32", {"precision": "fp32"}, None, ""),
        ("fp16_mixed", {"precision": "fp16_mixed"}, None, "GradScaler on DTensor gradients"),
        ("bf16_pure_anyprecision", {"precision": "bf16_pure", "fsdp_config.optimizer": "anyprecision",
                                    "use_kahan_summation": True}, None, "bf16 params + bf16 moments, Kahan"),
        ("no_activation_checkpointing", {"fsdp_config.fsdp_activation_checkpointing": False}, None, ""),
        ("lora", {"use_peft": True, "peft_method": "lora", "lr": 1e-4}, None, ""),
        ("llama_adapter", {"use_peft": True, "peft_method": "llama_adapter", "lr": 1e-3}, None, ""),
        ("full_state_dict_ckpt", {"fsdp_config.checkpoint_type": "FULL_STATE_DICT", "save_every_n_steps": half},
         None, "HF folder gathered on rank 0"),
        ("resume_part1", {"max_train_step": half, "save_every_n_steps": half}, None, "sharded checkpoint"),
        ("resume_part2", {"resume_from": "auto"}, "resume_part1", "continues resume_part1"),
        ("low_cpu_fsdp", {"low_cpu_fsdp": True}, None, "rank 0 reads, others meta + broadcast"),
        ("low_cpu_fsdp_lora", {"low_cpu_fsdp": True, "use_peft": True, "lr": 1e-4}, None, ""),
        ("cpu_offload", {"fsdp_config.fsdp_cpu_offload": True}, None, "CPUOffloadPolicy (pinned host shards)"),
    ]
    return runs


def step_records(out_dir: Path) -> list:
    recs = []
    for path in sorted(out_dir.glob("metrics_*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("kind") == "train_step":
                    recs.append(rec)
    return sorted(recs, key=lambda r: r["step"])


def run(name, flags, shared, args, world, model_dir, work, out) -> dict:
    run_out = work / (shared or name)
    run_out.mkdir(parents=True, exist_ok=True)
    cache = work / "data_cache"
    cache.mkdir(exist_ok=True)
    if not (run_out / "data_cache").exists():
        (run_out / "data_cache").symlink_to(cache)  # tokenise the data set once for all runs
    common = {"model_name": model_dir, "output_dir": run_out, "enable_fsdp": True,
              "context_length": args.context_length, "batch_size_training": args.batch_size, "num_epochs": 1,
              "max_train_step": args.steps, "run_validation": False, "save_metrics": True, "save_model": False,
              "precision": "bf16_mixed", "lr": 1e-5, "fsdp_config.fsdp_activation_checkpointing": True,
              "num_workers_dataloader": 1}
    all_flags = {**common, **flags}
    result_dir = out / "runs" / name
    shutil.rmtree(result_dir, ignore_errors=True)
    result_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(Path(__file__).resolve()), "--worker", "--result_dir", str(result_dir), "--"]
    for k, v in all_flags.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
               SHARDTUNE_PG_TIMEOUT_S="300", OMP_NUM_THREADS="4")
    before = {p.name for p in run_out.glob("metrics_*.jsonl")}
    t0 = time.time()
    status = "ok"
    with open(result_dir / "log.txt", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.run_timeout_s)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {args.run_timeout_s}s"
    wall = time.time() - t0
    new_metrics = [p for p in run_out.glob("metrics_*.jsonl") if p.name not in before]
    for p in new_metrics:
        shutil.copy(p, result_dir / p.name)
    recs = [json.loads(line) for p in new_metrics for line in p.read_text().splitlines()
            if line.strip() and json.loads(line).get("kind") == "train_step"]
    recs.sort(key=lambda r: r["step"])
    ranks = [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank*.json"))]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors and status == "ok":
        status = errors[0]
    elif errors:
        status += f": {errors[0]}"
    if status != "ok":
        tail = (result_dir / "log.txt").read_text(errors="replace").splitlines()[-15:]
        print("\n".join("    " + ln for ln in tail), flush=True)
    step_times = [r["step_time_s"] for r in recs[1:]] or [r["step_time_s"] for r in recs]
    res = {
        "name": name, "status": status, "wall_s": round(wall, 1), "flags": {k: str(v) for k, v in flags.items()},
        "steps": [r["step"] for r in recs], "losses": [r["loss"] for r in recs],
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "tokens_per_s_per_gpu": statistics.median([r["tokens_per_s"] for r in recs[1:]]) if len(recs) > 1 else None,
        "gpu_peak_allocated_gb": [round(r.get("gpu_peak_allocated_gb", 0), 2) for r in ranks],
        "gpu_peak_reserved_gb": [round(r.get("gpu_peak_reserved_gb", 0), 2) for r in ranks],
        "host_peak_rss_gb": [round(r.get("host_peak_rss_gb", 0), 2) for r in ranks],
        "output_dir": str(run_out),
    }
    print(f"--> {name}: {status} in {wall:.0f}s; losses {[round(x, 4) for x in res['losses']]}; GPU peak "
          f"{max(res['gpu_peak_allocated_gb'] or [0]):.1f} GB; host RSS {res['host_peak_rss_gb']}", flush=True)
    return res


def checks(results: dict, model_dir: Path, work: Path) -> list:
    """Cross-run checks, as (check, outcome) lines."""
    lines = []
    base = results.get("full_shard")
    if base and base["losses"]:
        for name in ("shard_grad_op", "no_shard", "hybrid_node_mesh", "hsdp_explicit", "no_activation_checkpointing",
                     "low_cpu_fsdp", "cpu_offload"):
            r = results.get(name)
            if r and r["losses"] and len(r["losses"]) == len(base["losses"]):
                diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
                lines.append((f"{name} vs full_shard: max |loss diff|", f"{diff:.2e} (bf16: expect < 1e-2)"))
        p1, p2 = results.get("resume_part1"), results.get("resume_part2")
        if p1 and p2 and p2["losses"]:
            resumed = p1["losses"] + p2["losses"]
            if len(resumed) == len(base["losses"]):
                diff = max(abs(a - b) for a, b in zip(resumed, base["losses"]))
                lines.append(("resume (stop at half, resume auto) vs uninterrupted full_shard: max |loss diff|",
                              f"{diff:.2e} (GPU kernels are not bit-deterministic: expect ~1e-3 or less)"))
    low = results.get("low_cpu_fsdp")
    if low and low["host_peak_rss_gb"]:
        rss = low["host_peak_rss_gb"]
        normal = base["host_peak_rss_gb"] if base else []
        lines.append(("low_cpu_fsdp host peak RSS: rank 0 vs other ranks (GB)",
                      f"{rss[0]:.2f} vs max {max(rss[1:] or [0]):.2f}; without low_cpu_fsdp every rank: "
                      f"{normal}"))
    full = results.get("full_state_dict_ckpt")
    if full and full["status"] == "ok":
        ckpts = sorted((Path(full["output_dir"]) / "checkpoints" / "fine-tuned").glob("step_*/model"))
        lines.append(("FULL_STATE_DICT checkpoint folders", ", ".join(str(c) for c in ckpts) or "none"))
        if ckpts:
            try:
                from transformers import AutoModelForCausalLM

                m = AutoModelForCausalLM.from_pretrained(ckpts[-1])
                lines.append(("FULL_STATE_DICT folder loads with AutoModelForCausalLM",
                              f"yes: {sum(p.numel() for p in m.parameters()) / 1e9:.2f}B params"))
                del m
            except Exception as exc:  # noqa: BLE001
                lines.append(("FULL_STATE_DICT folder loads with AutoModelForCausalLM", f"NO: {exc}"))
    if p1 := results.get("resume_part1"):
        ckpt_root = Path(p1["output_dir"]) / "checkpoints" / "fine-tuned"
        if any(ckpt_root.glob("step_*")):
            t0 = time.time()
            conv = work / "converted"
            proc = subprocess.run([sys.executable, "-m", "shardtune.model_checkpointing.convert", "--checkpoint",
                                   str(ckpt_root), "--output", str(conv)], cwd=REPO, capture_output=True, text=True,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
            lines.append(("convert newest sharded checkpoint -> HF folder",
                          f"exit {proc.returncode} in {time.time() - t0:.0f}s"
                          + ("" if proc.returncode == 0 else f": {proc.stderr.strip().splitlines()[-1:]}")))
    return lines


def markdown(results: dict, lines: list, meta: dict) -> str:
    out = [f"# FSDP matrix: {meta['model']} on {meta['world']} x {meta['gpu']}", "",
           f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}; context "
           f"{meta['context_length']}, batch {meta['batch_size']} per GPU, {meta['steps']} steps; total "
           f"{meta['total_s']:.0f}s", "",
           "| run | status | wall s | losses | step s | tok/s/GPU | GPU peak alloc GB (per rank) | host RSS GB "
           "(per rank) |", "|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        losses = " ".join(f"{x:.3f}" for x in r["losses"])
        step = f"{r['median_step_time_s']:.3f}" if r["median_step_time_s"] else "-"
        tps = f"{r['tokens_per_s_per_gpu']:.0f}" if r["tokens_per_s_per_gpu"] else "-"
        out.append(f"| {r['name']} | {r['status'][:60]} | {r['wall_s']} | {losses} | {step} | {tps} | "
                   f"{r['gpu_peak_allocated_gb']} | {r['host_peak_rss_gb']} |")
    out += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in lines]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result_dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT", "fsdp_matrix_out"))
    ap.add_argument("--model_dir", default="/tmp/fsdp_matrix/llama1b")
    ap.add_argument("--work_dir", default="/tmp/fsdp_matrix/runs", help="run outputs and checkpoints (large)")
    ap.add_argument("--nproc", type=int, default=0, help="GPUs per run (default: all)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--context_length", type=int, default=2048)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated run names")
    ap.add_argument("--run_timeout_s", type=int, default=240)
    ap.add_argument("--time_budget_s", type=int, default=420)
    args, rest = ap.parse_known_args()
    if args.worker:
        worker(Path(args.result_dir), [a for a in rest if a != "--"])
        return 0

    import peft
    import torch
    import transformers

    t_start = time.time()
    world = args.nproc or max(torch.cuda.device_count(), 1)
    out, work, model_dir = Path(args.out), Path(args.work_dir), Path(args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_model(model_dir)
    selected = [r for r in matrix(world, args.steps) if not args.only or r[0] in args.only.split(",")]
    if world < 2:
        print("warning: fewer than 2 GPUs; FSDP runs will use one process", flush=True)
    results = {}
    for name, flags, shared, note in selected:
        if time.time() - t_start > args.time_budget_s:
            results[name] = {"name": name, "status": "skipped (time budget)", "wall_s": 0, "losses": [],
                             "median_step_time_s": None, "tokens_per_s_per_gpu": None, "gpu_peak_allocated_gb": [],
                             "host_peak_rss_gb": [], "flags": flags, "output_dir": ""}
            continue
        if world < 2 and "fsdp_config.fsdp_cpu_offload" in flags:
            continue
        results[name] = run(name, flags, shared, args, world, model_dir, work, out)
        results[name]["note"] = note
    lines = checks(results, model_dir, work)
    meta = {"model": "Llama-3.2-1B shape (random weights)", "world": world,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "context_length": args.context_length, "batch_size": args.batch_size, "steps": args.steps,
            "total_s": time.time() - t_start}
    (out / "fsdp_matrix.json").write_text(json.dumps({"meta": meta, "runs": results, "checks": lines}, indent=2,
                                                     default=str))
    (out / "fsdp_matrix.md").write_text(markdown(results, lines, meta))
    print(markdown(results, lines, meta), flush=True)
    return 0 if all(r["status"].startswith(("ok", "skipped")) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
