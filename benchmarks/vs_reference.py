"""shardtune against the reference (llama-recipes / llama-cookbook) side by side, in one GPU call.

    python3 benchmarks/vs_reference.py --out $OUT --reference ../shared/bench/reference/run_reference.sh \
        --data alpaca_data.json --shape llama3.2-1b --nproc 1 --steps 20 --runs full_ac,full_noac,lora \
        --st_only default_ac,full_ac@sdpa,full_ac@nocompile
    python3 benchmarks/vs_reference.py --out /tmp/x --short      # harness check: 2 layers, 4 steps
    python3 benchmarks/vs_reference.py ... --runs full_ac --whole_run 20 --repeat   # launch to saved model

``--whole_run N``: the run users pay for, launch to the saved model: validation on (N eval batches), the end
checkpoint (SHARDED_STATE_DICT into --dist_checkpoint_folder fine-tuned) and, for shardtune, the exported model;
the table gains the wall time, the host peak RSS (saving included) and shardtune's phases (summary.json).
``--repeat``: each --runs mode's shardtune run a second time with the same command and output folder (its data cache and the
compile cache warm), as a user's second launch.

1. Builds the model shape once (benchmarks/make_random_model.py: random bf16 weights, real vocabulary)
   and writes the first --samples Alpaca records to one JSON file; both launchers read the same files.
2. For every mode in --runs, runs the reference (through run_reference.sh, which prints its tokens/s,
   peak memory, host RSS per rank and losses) and shardtune with the same flags
   (``--enable_fsdp --use_fast_kernels``, batch 4, context 4096 by default, packing, no validation, no
   saving), each under torchrun with --nproc processes; --st_only runs shardtune alone (levers:
   ``mode@lever`` or ``mode@lever+lever``, see LEVERS).
3. Prints one table (tokens/s per GPU, ratio to the reference, MFU, peak allocated / reserved GPU memory,
   host RSS per rank, loss after N steps, launch-to-first-step time) plus versions and GPU name, and
   writes it with every raw log under --out.

Tokens/s: the reference's comes from its tqdm rate x batch x context (its blocks are always full: it
concatenates documents and attends across them); shardtune's is the median step rate over the last two
thirds of the steps of all input tokens, padding included (its blocks keep documents whole, so a little
of each block is padding; the fill ratio is printed). MFU uses shardtune's analytic FLOPs per token for
both (the same model and context) over the GPU's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Flags both launchers get for each mode (llama-recipes names; shardtune accepts them unchanged).
MODES = {
    "full_ac": ["--fsdp_config.pure_bf16"],
    "full_noac": ["--fsdp_config.pure_bf16", "--fsdp_config.fsdp_activation_checkpointing", "False"],
    "lora": ["--use_peft", "--peft_method", "lora"],
    # QLoRA: 4-bit NF4 base weights (bitsandbytes); the reference's multi-GPU QLoRA command does not run
    "qlora": ["--use_peft", "--peft_method", "lora", "--quantization", "4bit", "--quantization_config.quant_type",
              "nf4"],
    "default_ac": [],      # shardtune's default precision (bf16 compute, fp32 master weights)
    "default_noac": ["--fsdp_config.fsdp_activation_checkpointing", "False"],
}
# shardtune-only variations: (extra flags, extra environment)
LEVERS = {
    "sdpa": (["--attn_implementation", "sdpa"], {}),
    "nocompile": (["--torch_compile", "False"], {}),
    "old": (["--attn_implementation", "sdpa", "--torch_compile", "False"], {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
    "fixedseg": ([], {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
    "lowcpu": (["--low_cpu_fsdp"], {}),
    "ac2": (["--fsdp_config.ac_every_n_layers", "2"], {}),
    "acall": (["--fsdp_config.ac_every_n_layers", "1"], {}),  # every layer, as the reference (default: auto)
    "zero2": (["--fsdp_config.sharding_strategy", "SHARD_GRAD_OP"], {}),
    "keep1": (["--fsdp_config.keep_gathered_layers", "1"], {}),
    # the memory plan's budget as a share of the GPU instead of the default (the conventional step's memory)
    "frac50": (["--fsdp_config.ac_memory_fraction", "0.5"], {}),
    "frac90": (["--fsdp_config.ac_memory_fraction", "0.9"], {}),  # reshard every layer but the last (session 4)
    "cta8": ([], {"NCCL_MAX_CTAS": "8"}),  # fewer SMs for NCCL: less contention with compute kernels
    "cta4": ([], {"NCCL_MAX_CTAS": "4"}),
    "cta16": ([], {"NCCL_MAX_CTAS": "16"}),
    "hiprio": ([], {"TORCH_NCCL_HIGH_PRIORITY": "1"}),
    "save4": (["--save_every_n_steps", "4"], {}),  # periodic checkpoints (background writes) during the run
    "prof": (["--use_profiler", "True", "--profiler_wait", "8", "--profiler_warmup", "2", "--profiler_active", "3"],
             {}),
}


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


class RssSampler(threading.Thread):
    """Peak RSS of every rank (processes whose command line matches ``pattern``, not their forked workers),
    polled each second,
    and the time at which ``first_step`` first appears in ``log``."""

    def __init__(self, pattern: str, log: Path, first_step: str):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.pattern, self.log, self.first_step = psutil, pattern, log, re.compile(first_step)
        self.peaks, self.first_step_at, self.stop, self.t0 = {}, None, threading.Event(), time.time()

    def run(self):
        while not self.stop.wait(1.0):
            ranks = {}
            for p in self.psutil.process_iter(["pid", "ppid", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if self.pattern in cmd and "torchrun" not in cmd and "torch.distributed.run" not in cmd \
                        and p.info["memory_info"] is not None:
                    ranks[p.info["pid"]] = (p.info["ppid"], p.info["memory_info"].rss)
            for pid, (ppid, rss) in ranks.items():
                if ppid not in ranks:  # a rank, not one of its data-loader workers (same command line)
                    self.peaks[pid] = max(self.peaks.get(pid, 0), rss)
            if self.first_step_at is None and self.log.exists():
                if self.first_step.search(self.log.read_text(errors="replace")):
                    self.first_step_at = time.time() - self.t0

    def result(self):
        self.stop.set()
        self.join()
        return sorted(round(v / 2 ** 30, 1) for v in self.peaks.values()), self.first_step_at


def run_flags(args, out_dir: Path) -> list:
    """Validation and saving: off for step-rate runs; on for --whole_run (the same flags for both tools)."""
    if not args.whole_run:
        return ["--run_validation", "False", "--save_model", "False"]
    return ["--run_validation", "True", "--max_eval_step", str(args.whole_run), "--save_model", "True",
            "--dist_checkpoint_root_folder", str(out_dir / "checkpoints"), "--dist_checkpoint_folder", "fine-tuned"]


def run_reference(args, mode, model, data, work) -> dict:
    log = work / f"ref_{mode}.log"
    out_dir = work / f"ref_out_{mode}"
    shutil.rmtree(out_dir, ignore_errors=True)
    flags = ["--model_name", str(model), "--enable_fsdp", "--use_fast_kernels", *MODES[mode],
             "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data),
             "--batch_size_training", str(args.batch), "--context_length", str(args.context),
             *run_flags(args, out_dir), "--num_epochs", "1",
             "--max_train_step", str(args.steps), "--output_dir", str(out_dir)]
    sampler = RssSampler("llama_cookbook.finetuning", log, r"completed \(loss")
    sampler.start()
    t0 = time.time()
    proc = subprocess.run(["bash", args.reference, str(args.nproc), str(log), "--", *flags], text=True,
                          capture_output=True, env=dict(os.environ))
    wall = time.time() - t0
    _, first = sampler.result()
    line = (proc.stdout.strip().splitlines() or [""])[-1]
    print(f"   {line}", flush=True)
    m = {k: re.search(p, line) for k, p in dict(tps=r"tokens/s/gpu=([0-9.]+)", alloc=r"peak_alloc_GB=([0-9.?]+)",
                                                  res=r"peak_reserved_GB=([0-9.?]+)", rss=r"per_rank=(\[[^\]]*\])",
                                                  loss=r"loss=([0-9.]+)->([0-9.]+)").items()}
    num = lambda x: float(x) if x not in (None, "?") else None  # noqa: E731
    text = log.read_text(errors="replace")
    evals = re.findall(r"eval_ppl=.*?eval_epoch_loss=tensor\(([0-9.]+)", text)
    return dict(who="reference", mode=mode, rc=proc.returncode, tps=num(m["tps"] and m["tps"].group(1)),
                eval_loss=num(evals[-1]) if evals else None,
                alloc=num(m["alloc"] and m["alloc"].group(1)), reserved=num(m["res"] and m["res"].group(1)),
                rss=json.loads(m["rss"].group(1)) if m["rss"] else [],
                loss_first=num(m["loss"] and m["loss"].group(1)), loss=num(m["loss"] and m["loss"].group(2)),
                first_step_s=first, wall_s=wall, log=str(log))


def run_shardtune(args, name, model, data, work, again: bool = False) -> dict:
    """One shardtune run; ``again``: the second launch of the same command into the same output folder."""
    mode, _, levers = name.partition("@")  # levers combine: mode@zero2+cta8
    extra, env_extra = [], {}
    for lever in filter(None, levers.split("+")):
        extra, env_extra = extra + LEVERS[lever][0], {**env_extra, **LEVERS[lever][1]}
    tag = re.sub(r"[@+]", "_", name)
    out_dir = work / f"st_out_{tag}"
    if not again:
        shutil.rmtree(out_dir, ignore_errors=True)
    log = work / f"st_{tag}{'_again' if again else ''}.log"
    flags = ["--model_name", str(model), "--enable_fsdp", "--use_fast_kernels", *MODES[mode], *extra,
             "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data),
             "--batch_size_training", str(args.batch), "--context_length", str(args.context),
             *run_flags(args, out_dir), "--num_epochs", "1",
             "--max_train_step", str(args.steps), "--output_dir", str(out_dir), "--save_metrics", "True",
             *(["--overwrite_output_dir"] if again else [])]  # keeps the data cache, replaces the results
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    sampler = RssSampler(str(REPO / "finetuning.py"), log, r"(?m)^step 1 \|")
    sampler.start()
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(args.nproc), str(REPO / "finetuning.py"), *flags], stdout=fh, stderr=subprocess.STDOUT,
                            env=env).returncode
    wall = time.time() - t0
    rss, first = sampler.result()
    text = log.read_text(errors="replace")
    res = dict(who="shardtune", mode=name + (" (again)" if again else ""), rc=rc, rss=rss, first_step_s=first,
               wall_s=wall, log=str(log))
    metrics = sorted(out_dir.glob("metrics_*.jsonl"))
    res["diverged"] = "training diverged" in text  # the divergence guard (--divergence_factor, on by default)
    if rc != 0 or not metrics:
        print("   shardtune failed:\n" + "\n".join(text.splitlines()[-25:]), flush=True)
        return res
    steps = [json.loads(x) for x in metrics[0].read_text().splitlines() if '"train_step"' in x]
    steady = steps[len(steps) // 3:] or steps
    summary = json.loads((out_dir / "summary.json").read_text())
    fill = re.search(r"blocks of \d+ tokens \((\d+)% filled\)", text)
    gflop = re.search(r"analytic ([0-9.]+) GFLOP per token", text)
    ac = re.search(r"activation checkpointing:? (?:on for (\d+) of (\d+)|off)", text)
    estimate = re.search(r"auto: estimated peak ([0-9.]+) GB", text)  # the memory plan's, beside the measured peak
    gathered = re.search(r"the last (\d+) of (\d+) decoder layers stay gathered", text)
    res.update(tps=statistics.median(s["tokens_per_s"] for s in steady),
               mfu=statistics.median(s["mfu"] for s in steady) if steady[0].get("mfu") is not None else None,
               alloc=summary.get("peak_allocated_gb"), reserved=summary.get("peak_reserved_gb"),
               loss_first=steps[0]["loss"], loss=steps[-1]["loss"], fill=fill and int(fill.group(1)),
               gflop_per_token=gflop and float(gflop.group(1)), steps=len(steps),
               estimate=estimate and float(estimate.group(1)),
               ac=ac and (f"{ac.group(1)}/{ac.group(2)}" if ac.group(1) else "off"),
               gathered=gathered and f"{gathered.group(1)}/{gathered.group(2)}",
               eval_loss=summary.get("eval_loss"), phases=summary.get("phases_s"))
    print(f"   shardtune {name}: {res['tps']:.0f} tok/s/gpu, MFU {100 * (res['mfu'] or 0):.1f}%, "
          f"alloc/reserved {res['alloc']}/{res['reserved']} GB (plan estimate {res['estimate']}), RSS {rss}, "
          f"loss {res['loss_first']:.3f}->"
          f"{res['loss']:.3f}, first step after {first}s", flush=True)
    return res


def fmt(x, spec="{:.1f}"):
    return "-" if x is None else spec.format(x)


def table(results, env) -> str:
    ref = {r["mode"]: r for r in results if r["who"] == "reference"}
    st_mfu = {r["mode"].partition("@")[0]: r for r in results if r["who"] == "shardtune" and r.get("mfu")}
    lines = [f"{env}", "",
             "| run | tok/s/GPU | vs reference | MFU | peak alloc / reserved GB | plan's estimate GB | "
             "host RSS GB per rank | loss step 1 -> N | launch to step 1 s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = ref.get(r["mode"].partition("@")[0])
        ratio = f"{r['tps'] / base['tps']:.2f}x" if r["who"] == "shardtune" and base and base.get("tps") \
            and r.get("tps") else "-"
        mfu = r.get("mfu")
        if r["who"] == "reference" and r.get("tps") and r["mode"] in st_mfu:  # same analytic FLOPs per token
            s = st_mfu[r["mode"]]
            mfu = s["mfu"] * r["tps"] / s["tps"]
        name = f"{r['who']} {r['mode']}" + (f" (rc={r['rc']})" if r.get("rc") else "") \
            + (f" (AC layers {r['ac']})" if r.get("ac") else "") \
            + (f" (kept gathered {r['gathered']})" if r.get("gathered") else "") \
            + (f" ({r['fill']}% filled)" if r.get("fill") else "") + (" (DIVERGED)" if r.get("diverged") else "")
        lines.append(f"| {name} | {fmt(r.get('tps'), '{:,.0f}')} | {ratio} | {fmt(mfu and 100 * mfu)}% | "
                     f"{fmt(r.get('alloc'))} / {fmt(r.get('reserved'))} | {fmt(r.get('estimate'))} | {r.get('rss')} | "
                     f"{fmt(r.get('loss_first'), '{:.3f}')} -> {fmt(r.get('loss'), '{:.3f}')} | "
                     f"{fmt(r.get('first_step_s'), '{:.0f}')} |")
    if any(r.get("eval_loss") is not None or r.get("phases") for r in results):  # --whole_run
        lines += ["", "| run | launch to saved model s | launch to step 1 s | host peak RSS GB per rank | eval loss | "
                  "phases s |", "|---|---|---|---|---|---|"]
        for r in results:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in (r.get("phases") or {}).items()
                               if isinstance(v, (int, float)))
            lines.append(f"| {r['who']} {r['mode']} | {fmt(r.get('wall_s'), '{:.0f}')} | "
                         f"{fmt(r.get('first_step_s'), '{:.0f}')} | {r.get('rss')} | "
                         f"{fmt(r.get('eval_loss'), '{:.3f}')} | {phases or '-'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results: table.md, results.json, logs_tail.txt")
    ap.add_argument("--work", default="/tmp/vs_reference", help="model, data, full logs and run outputs")
    ap.add_argument("--reference", default="", help="run_reference.sh; empty: shardtune only")
    ap.add_argument("--data", default="", help="Alpaca JSON (default: the bundled sample)")
    ap.add_argument("--samples", type=int, default=3000, help="records taken from --data")
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--layers", type=int, default=0, help="override the number of decoder layers")
    ap.add_argument("--model_dir", default="", help="reuse / write the model here (default /tmp/vs_reference/SHAPE)")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--runs", default="full_ac,full_noac,lora", help="modes run by both launchers")
    ap.add_argument("--st_only", default="default_ac", help="shardtune-only runs: mode or mode@lever")
    ap.add_argument("--whole_run", type=int, default=0, metavar="N",
                    help="validation (N eval batches) and saving on: launch to saved model (module docstring)")
    ap.add_argument("--repeat", action="store_true", help="each --runs mode's shardtune run twice (warm caches)")
    ap.add_argument("--short", action="store_true", help="harness check: 2 layers, 4 steps, context 512, full_ac")
    args = ap.parse_args()
    if args.short:
        args.layers, args.steps, args.context, args.samples = args.layers or 2, 4, 512, min(args.samples, 300)
        args.runs, args.st_only = "full_ac", ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model = Path(args.model_dir) if args.model_dir else work / (args.shape + (f"-{args.layers}l" if args.layers else ""))

    import torch
    import transformers

    if not (model / "config.json").exists():
        cmd = [sys.executable, str(REPO / "benchmarks" / "make_random_model.py"), "--shape", args.shape,
               "--out", str(model)] + (["--layers", str(args.layers)] if args.layers else [])
        print(sh(cmd, env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))),
              end="", flush=True)
    from shardtune.configs.paths import BUNDLED_ALPACA_SAMPLE

    records = json.loads(Path(args.data or BUNDLED_ALPACA_SAMPLE).read_text())[: args.samples]
    data = work / f"alpaca_{len(records)}.json"
    data.write_text(json.dumps(records))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    env = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.nproc} x {gpu}; torch {torch.__version__}, "
           f"transformers {transformers.__version__}; {args.shape}" + (f" ({args.layers} layers)" if args.layers else "")
           + f"; {len(records)} Alpaca records; batch {args.batch} x {args.context}; {args.steps} steps")
    print(env, flush=True)

    results = []

    def save():  # after every run: a call cut off by its time limit still returns what it measured
        text = table(results, env)
        (out / "table.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        with open(out / "logs_tail.txt", "w") as fh:  # the device returns few files: the end of every log in one
            for r in results:
                lines = Path(r["log"]).read_text(errors="replace").replace("\r", "\n").splitlines()
                fh.write(f"==== {r['who']} {r['mode']} ({r['log']})\n" + "\n".join(
                    ln for ln in lines[-60:] if "it/s]" not in ln and "s/it]" not in ln) + "\n")
        return text

    for mode in [m for m in args.runs.split(",") if m]:
        if args.reference:
            print(f"-- reference {mode}", flush=True)
            results.append(run_reference(args, mode, model, data, logs))
            save()
        print(f"-- shardtune {mode}", flush=True)
        results.append(run_shardtune(args, mode, model, data, logs))
        save()
        if args.repeat:
            results.append(run_shardtune(args, mode, model, data, logs, again=True))
            save()
    for name in [m for m in args.st_only.split(",") if m]:
        print(f"-- shardtune {name}", flush=True)
        results.append(run_shardtune(args, name, model, data, logs))
        save()
    print("\n" + save(), flush=True)
    return 0 if all(r.get("rc") == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
