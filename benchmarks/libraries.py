"""Our hand-written pieces against the well-kept library that does the same job, on the same input (docs/libraries.md).

    python benchmarks/libraries.py                 # every item
    python benchmarks/libraries.py loss optimizer  # some: help atomic packing sampler cache loss optimizer trackers
                                                   #       heartbeat
Libraries that are not shardtune dependencies are imported when present and reported as missing otherwise; the
numbers in docs/libraries.md were taken with them installed apart from the project's venv:
``pip install --no-deps --target /tmp/libs-site trl==1.16.0 torchao==0.18.0 rich-argparse==1.8.0 atomicwrites==1.4.1
torchdata==0.11.0 liger-kernel==0.8.5`` and ``PYTHONPATH=.:/tmp/libs-site``. Times are the minimum of several runs
(timeit); peak memory is the growth of the peak RSS of a fresh subprocess that runs one variant.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_of(fn, repeat: int = 5, number: int = 1) -> float:
    """Seconds per call: the minimum over ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, repeat=repeat, number=number)) / number


def optional(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - missing, or present but unusable here (liger needs triton)
        print(f"  {module}: not usable here ({type(exc).__name__}: {exc})")
        return None


HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"


def peak_rss_growth_mb(code: str) -> float:
    """MiB the peak RSS of a fresh interpreter grows while running ``code`` (after its setup, marked by 'GO').
    VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak."""
    script = code.replace("GO", f"base = {HWM}") + f"\nprint(({HWM} - base) / 1024)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return float(out.stdout.split()[-1])


# --- loss: models/loss.py ChunkedLinearCrossEntropy vs torch's F.linear_cross_entropy (torch >= 2.13) -------------

LOSS_SETUP = """
import torch, torch.nn.functional as F
from shardtune.models.loss import chunked_linear_cross_entropy_sum
torch.manual_seed(0)
N, H, V = {n}, {h}, {v}
hidden = torch.randn(N, H, requires_grad=True); weight = (torch.randn(V, H) / H ** 0.5).requires_grad_()
targets = torch.randint(0, V, (N,))
"""
LOSS_VARIANTS = {
    "full logits (F.cross_entropy)": "F.cross_entropy(hidden @ weight.t(), targets, reduction='sum')",
    "shardtune chunked": "chunked_linear_cross_entropy_sum(hidden, weight, targets, chunk_rows={rows})",
    "torch F.linear_cross_entropy": ("F.linear_cross_entropy(hidden, weight, targets, reduction='sum', "
                                     "options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size={rows}))"),
}


def bench_loss() -> None:
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        print(f"  torch {torch.__version__} has no chunked F.linear_cross_entropy")
        return
    n, h, v, rows = 2048, 128, 32768, 512
    print(f"  N={n} supervised tokens, H={h}, V={v}, {rows} rows per chunk, fp32, forward + backward")
    scope = {}
    exec(LOSS_SETUP.format(n=n, h=h, v=v), scope)
    ref_h, ref_w = scope["hidden"].double().detach().requires_grad_(), scope["weight"].double().detach().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.t(), scope["targets"], reduction="sum")
    ref.backward()
    for name, expr in LOSS_VARIANTS.items():
        expr = expr.format(rows=rows)

        def run():
            scope["hidden"].grad = scope["weight"].grad = None
            loss = eval(expr, scope)
            loss.backward()
            return loss

        loss = run().detach()
        err = max(float((scope["hidden"].grad - ref_h.grad).abs().max()), float((scope["weight"].grad - ref_w.grad).abs().max()))
        seconds = best_of(run, repeat=5)
        mem = peak_rss_growth_mb(LOSS_SETUP.format(n=n, h=h, v=v) + "GO\n" + f"({expr}).backward()")
        print(f"  {name:32s} loss rel err {abs(float(loss) - float(ref)) / float(ref):.1e}  grad max err {err:.1e}  "
              f"{seconds * 1000:7.0f} ms  peak +{mem:5.0f} MiB")
    # bf16 compute (what a bf16_mixed run does on a GPU), against the fp64 reference. Ours follows autocast; torch's
    # ignores it (computes in the inputs' dtype), so a switch would cast its inputs to bf16 itself.
    cast = "torch F.linear_cross_entropy, inputs cast to bf16"
    LOSS_VARIANTS[cast] = LOSS_VARIANTS["torch F.linear_cross_entropy"].replace("(hidden, weight,", \
        "(hidden.bfloat16(), weight.bfloat16(),")
    per_token = "torch, bf16 inputs, reduction='none', fp32 sum"
    LOSS_VARIANTS[per_token] = LOSS_VARIANTS[cast].replace("reduction='sum'", "reduction='none'") + ".float().sum()"
    for name in ("shardtune chunked", "torch F.linear_cross_entropy", cast, per_token):
        expr = LOSS_VARIANTS[name].format(rows=rows)
        scope["hidden"].grad = scope["weight"].grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = eval(expr, scope)
            loss.backward()
        gerr = float((scope["weight"].grad - ref_w.grad).abs().max() / ref_w.grad.abs().max())
        herr = float((scope["hidden"].grad - ref_h.grad).abs().max() / ref_h.grad.abs().max())
        print(f"  {name:50s} bf16: loss {str(loss.dtype)[6:]} rel err {abs(float(loss) - float(ref)) / float(ref):.1e}, "
              f"grad rel err hidden {herr:.1e} weight {gerr:.1e}")
    # A frozen head (LoRA): no weight gradient is needed.
    scope["weight"].requires_grad_(False)
    for name in ("shardtune chunked", "torch F.linear_cross_entropy"):
        expr = LOSS_VARIANTS[name].format(rows=rows)
        seconds = best_of(lambda: eval(expr, scope).backward(), repeat=5)
        print(f"  {name:32s} frozen head: {seconds * 1000:7.0f} ms")
    liger = optional("liger_kernel.transformers")
    if liger is None:
        print("  liger-kernel: Triton kernels, CUDA only: not measured here")


# --- optimizer: policies/anyprecision_optimizer.py AnyPrecisionAdamW vs torchao's _AdamW(bf16_stochastic_round) ---

def _train(make_opt, dtype, steps: int = 300, seed: int = 0):
    """A small least-squares problem (a 256 x 256 weight) trained from one init; returns (weight, seconds per
    optimizer step, optimizer)."""
    g = torch.Generator().manual_seed(seed)
    x, target = torch.randn(512, 256, generator=g), torch.randn(256, 256, generator=g) / 16
    y = x @ target
    weight = (torch.randn(256, 256, generator=g) / 16).to(dtype).requires_grad_()
    opt = make_opt([weight])
    losses = []

    def step():
        loss = ((x.to(dtype) @ weight - y.to(dtype)).float() ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())

    for _ in range(steps):
        step()
    weight.grad = torch.ones_like(weight)  # the optimizer's step alone, timed (torchao compiled it at step 1)
    trained = weight.detach().float().clone()
    seconds = best_of(opt.step, repeat=5, number=10)
    return trained, seconds, opt


def bench_optimizer() -> None:
    from shardtune.policies.anyprecision_optimizer import AnyPrecisionAdamW

    lr = 1e-3
    ref, _, _ = _train(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), torch.float32)
    variants = {
        "torch AdamW, fp32 weights (the reference)": (lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
                                                      torch.float32),
        "torch AdamW, bf16 weights + state": (lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), torch.bfloat16),
        "AnyPrecisionAdamW bf16, no Kahan": (lambda p: AnyPrecisionAdamW(p, lr=lr), torch.bfloat16),
        "AnyPrecisionAdamW bf16, Kahan": (lambda p: AnyPrecisionAdamW(p, lr=lr, use_kahan_summation=True),
                                          torch.bfloat16),
    }
    torchao_optim = optional("torchao.optim")
    if torchao_optim is not None:
        variants["torchao _AdamW bf16, stochastic rounding"] = (
            lambda p: torchao_optim._AdamW(p, lr=lr, weight_decay=0.0, bf16_stochastic_round=True), torch.bfloat16)
    print(f"  300 AdamW steps (lr {lr}) of a 256 x 256 least-squares weight; distance to the fp32 trajectory")
    for name, (make, dtype) in variants.items():
        weight, seconds, opt = _train(make, dtype)
        state = opt.state[next(iter(opt.state))]
        state_bytes = sum(v.element_size() * v.numel() for v in state.values()
                          if torch.is_tensor(v) and v.dim()) / weight.numel()
        rel = float((weight - ref).norm() / ref.norm())
        print(f"  {name:44s} rel distance {rel:.1e}  {seconds * 1000:6.2f} ms/step  state {state_bytes:.0f} B/param")


# --- packing: data/packing.py plan_blocks (best-fit decreasing) vs TRL's pack_dataset(strategy="bfd") -----------

def alpaca_samples(limit: int = 2000):
    """The bundled Alpaca sample tokenised with the bundled tiny Llama's tokenizer, as shardtune does."""
    from transformers import AutoTokenizer

    from shardtune.configs.paths import ASSETS_DIR
    from shardtune.datasets.alpaca_dataset import format_prompt
    from shardtune.datasets.common import tokenize_prompt_and_target

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
    records = json.loads((ASSETS_DIR / "alpaca_sample" / "alpaca_sample.json").read_text())[:limit]
    return [tokenize_prompt_and_target({"prompt": format_prompt(r), "target": r["output"]}, tokenizer)
            for r in records]


def bench_packing() -> None:
    from datasets import Dataset

    from shardtune.data.packing import pack_dataset, plan_blocks

    samples = alpaca_samples()
    for block in (256, 1024):
        lengths = [min(len(s["input_ids"]), block) for s in samples]
        blocks = plan_blocks(lengths, block)
        ours_s = best_of(lambda: pack_dataset(samples, block, 0), repeat=3)
        print(f"  block {block}, {len(samples)} Alpaca samples, {sum(lengths)} tokens: shardtune {len(blocks)} blocks "
              f"(fill {sum(lengths) / (len(blocks) * block):.3f}), plan {ours_s * 1000:.0f} ms (blocks built on access)")
        trl_data = optional("trl.data_utils")
        if trl_data is None:
            continue
        dataset = Dataset.from_dict({"input_ids": [s["input_ids"] for s in samples],
                                     "labels": [s["labels"] for s in samples]})
        packed = trl_data.pack_dataset(dataset, block, strategy="bfd")
        trl_s = best_of(lambda: trl_data.pack_dataset(dataset, block, strategy="bfd"), repeat=3)
        kept = sum(len(r) for r in packed["input_ids"])
        print(f"  {'':9s} TRL bfd: {len(packed)} rows (fill {kept / (len(packed) * block):.3f}, {kept} tokens kept), "
              f"{trl_s * 1000:.0f} ms, columns {packed.column_names}; rows are unpadded, boundaries in seq_lengths")


# --- sampler: data/sampler.py vs torch's DistributedSampler + BatchSampler and torchdata's StatefulDataLoader ------

def bench_sampler() -> None:
    from torch.utils.data import BatchSampler, DistributedSampler

    from shardtune.data.sampler import RandomBatchSampler

    n, world = 10, 4
    ours = [list(RandomBatchSampler(n, 2, seed=0, num_replicas=world, rank=r)) for r in range(world)]
    real = [i for rank in ours for batch in rank for i in batch if i < n]
    print(f"  {n} samples, {world} ranks, batch 2: shardtune yields {len(real)} real samples ({len(set(real))} distinct), "
          "fillers are index + n (labels -100: weight 0)")
    theirs = [i for r in range(world) for i in DistributedSampler(range(n), num_replicas=world, rank=r, seed=0)]
    print(f"  {'':25s} DistributedSampler yields {len(theirs)} samples ({len(set(theirs))} distinct): "
          f"{len(theirs) - len(set(theirs))} repeated, counted twice in the loss (or drop_last drops them)")
    # Resume after 3 batches of 4 on 1 rank, continuing with batch 2 (or on another world size).
    whole = [i for b in RandomBatchSampler(24, 4, seed=0) for i in b]
    resumed = RandomBatchSampler(24, 2, seed=0)
    resumed.start_at(12, order_batch_size=4)
    print(f"  resume at sample 12 with another batch size: shardtune continues the epoch's order exactly: "
          f"{[i for b in resumed for i in b] == whole[12:]}")
    sdl = optional("torchdata.stateful_dataloader")
    if sdl is None:
        return
    data = list(range(24))
    sampler = BatchSampler(torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(0)), 4, False)
    loader = sdl.StatefulDataLoader(data, batch_sampler=sampler)
    it = iter(loader)
    for _ in range(3):  # 3 batches taken, then the run stops
        next(it)
    state = loader.state_dict()
    rest = [b.tolist() for b in it]
    again = sdl.StatefulDataLoader(data, batch_sampler=BatchSampler(torch.utils.data.RandomSampler(
        data, generator=torch.Generator().manual_seed(0)), 4, False))
    again.load_state_dict(state)
    same = [b.tolist() for b in again] == rest
    other = sdl.StatefulDataLoader(data, batch_sampler=BatchSampler(torch.utils.data.RandomSampler(
        data, generator=torch.Generator().manual_seed(0)), 2, False))
    other.load_state_dict(state)
    left = [i for b in other for i in b]
    expected = [i for b in rest for i in b]
    print(f"  torchdata StatefulDataLoader: same layout resumes exactly: {same}; batch 4 -> 2 continues the order: "
          f"{left == expected} ({len(left)} samples left, {len(expected)} expected; it skips batches, not samples)")


# --- cache: datasets/cache.py's explicit key vs the datasets library's own fingerprint of the tokenising map -------

CACHE_PROBE = """
import json, sys, time
from transformers import AutoTokenizer
from datasets.fingerprint import Hasher
from shardtune.configs.paths import ASSETS_DIR
from shardtune.datasets.cache import tokenizer_fingerprint
tok = AutoTokenizer.from_pretrained(ASSETS_DIR / "tiny-llama")
t0 = time.perf_counter(); ours_before = tokenizer_fingerprint(tok); t1 = time.perf_counter()
theirs_before = Hasher.hash(tok); t2 = time.perf_counter()
import shutil, tempfile
copy = AutoTokenizer.from_pretrained(shutil.copytree(ASSETS_DIR / "tiny-llama", tempfile.mkdtemp() + "/copy"))
copies = dict(ours=ours_before == tokenizer_fingerprint(copy), theirs=theirs_before == Hasher.hash(copy))
tok(["some text"], truncation=True, max_length=8)  # shardtune never truncates in the tokenizer
after = dict(ours=tokenizer_fingerprint(tok), theirs=Hasher.hash(tok))
tok("some text")
print(json.dumps(dict(ours=[ours_before, after["ours"], tokenizer_fingerprint(tok)], copies=copies, ours_s=t1 - t0,
                      theirs=[theirs_before, after["theirs"], Hasher.hash(tok)], theirs_s=t2 - t1)))
"""


def bench_cache() -> None:
    runs = [json.loads(subprocess.run([sys.executable, "-c", CACHE_PROBE], capture_output=True, text=True, check=True,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.splitlines()[-1])
            for _ in range(2)]
    for who, label in (("ours", "shardtune tokenizer_fingerprint"), ("theirs", "datasets Hasher.hash(tokenizer)")):
        values = [h for run in runs for h in run[who]]
        first = runs[0][who]
        print(f"  {label:34s} {min(run[who + '_s'] for run in runs) * 1000:6.1f} ms; same in a second process: "
              f"{first[0] == runs[1][who][0]}; same for a copy of the tokenizer in another folder: "
              f"{runs[0]['copies'][who]}; same after a call with truncation=True: {first[0] == first[1]}, and after a "
              f"plain call: {first[0] == first[2]}; distinct values {len(set(values))}")
    from datasets import Dataset

    in_memory = Dataset.from_dict({"i": list(range(10))}).map(lambda b: b, batched=True)
    print(f"  datasets' own map cache on an in-memory Dataset (how our examples arrive): cache files "
          f"{in_memory.cache_files} (nothing reused by a later run)")


# --- atomic: utils/io.py atomic_write_text / atomic_directory vs atomicwrites, and safetensors' own writes --------

KILLED_WRITER = """
import sys
path, how = sys.argv[1], sys.argv[2]
text = "x" * (400 << 20)
if how == "ours":
    from shardtune.utils.io import atomic_write_text
    atomic_write_text(path, text)
else:
    from atomicwrites import atomic_write
    with atomic_write(path, overwrite=True) as fh:
        fh.write(text)
"""


def _count_fsyncs(fn, module=None) -> int:
    """fsync calls made by ``fn`` (atomicwrites binds os.fsync at import as ``_proper_fsync``: counted there)."""
    calls, real = [], os.fsync
    counting = lambda fd: (calls.append(fd), real(fd))[1]  # noqa: E731
    os.fsync = counting
    if module is not None:
        module._proper_fsync = counting
    try:
        fn()
    finally:
        os.fsync = real
        if module is not None:
            module._proper_fsync = real
    return len(calls)


def bench_atomic() -> None:
    import time

    from safetensors.torch import save_file

    from shardtune.utils.io import atomic_write_text

    atomicwrites = optional("atomicwrites")
    text = "settings: 1\n" * 100
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        target = Path(tmp) / "run.json"
        writers = {"shardtune atomic_write_text": lambda: atomic_write_text(target, text)}
        if atomicwrites is not None:
            def via_atomicwrites():
                with atomicwrites.atomic_write(target, overwrite=True) as fh:
                    fh.write(text)

            writers["atomicwrites.atomic_write"] = via_atomicwrites
        for name, write in writers.items():
            fsyncs = _count_fsyncs(write, None if 'shardtune' in name else atomicwrites)
            print(f"  {name:30s} 1.2 KB file: {best_of(write, repeat=5, number=20) * 1000:6.2f} ms, {fsyncs} fsync "
                  f"call(s){' (the file, then its folder)' if fsyncs == 2 else ' (the file; not its folder)'}")
            # Killed while writing 400 MB over an existing file: the old file must survive whole.
            atomic_write_text(target, "old")
            child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), "ours" if "shardtune" in name
                                      else "theirs"], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            time.sleep(1.5)
            child.kill()
            child.wait()
            left = [p.name for p in Path(tmp).iterdir() if p != target]
            print(f"  {'':30s} killed mid-write: old file intact: {target.read_text() == 'old'}; temporary files left: "
                  f"{len(left)}")
            for p in left:
                (Path(tmp) / p).unlink()
        # safetensors (0.8) writes a temporary file and renames it (a new inode), with no fsync (strace shows none).
        weights = Path(tmp) / "model.safetensors"
        save_file({"w": torch.zeros(4)}, str(weights))
        inode = weights.stat().st_ino
        save_file({"w": torch.ones(4)}, str(weights))
        print(f"  safetensors.save_file over an existing file: replaced by a rename (new inode): "
              f"{weights.stat().st_ino != inode}; neither library replaces a folder (atomic_directory: renameat2 swap)")


# --- trackers: observability/trackers.py's thin wrappers vs accelerate.tracking's ----------------------------------

def _read_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def bench_trackers() -> None:
    from accelerate.state import PartialState
    from accelerate.tracking import TensorBoardTracker as AccelerateTensorBoard

    from shardtune.observability.trackers import TensorBoardTracker, scalars

    records = [("train_step", {"step": k, "epoch": 0, "loss": 3.0 - k / 100, "lr": 1e-4, "grad_norm": 1.0})
               for k in range(1, 1001)]
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        ours = TensorBoardTracker(Path(tmp) / "ours")
        t_ours = best_of(lambda: [ours.write(kind, values) for kind, values in records], repeat=1)  # once: the same
        # steps written twice would read back as a restarted run
        ours.close()
        theirs = AccelerateTensorBoard("run", Path(tmp) / "accelerate")
        try:
            theirs.log({"train/loss": 1.0}, step=0)
            print("  accelerate's TensorBoardTracker logs without start() / PartialState")
        except AttributeError as exc:
            print(f"  accelerate's TensorBoardTracker before start(): {type(exc).__name__}: {exc} (it needs "
                  "PartialState, which owns the process group under torchrun)")
        PartialState()
        theirs.start()
        t_theirs = best_of(lambda: [theirs.log(scalars(kind, values), step=values["step"]) for kind, values in records],
                           repeat=1)
        theirs.finish()
        same = _read_scalars(Path(tmp) / "ours") == _read_scalars(Path(tmp) / "accelerate" / "run")
        print(f"  1000 train_step records: ours {t_ours * 1000:.1f} ms, accelerate {t_theirs * 1000:.1f} ms; "
              f"identical scalars read back: {same} (both call SummaryWriter.add_scalar; the record -> tag mapping is "
              "ours either way)")


# --- heartbeat: utils/heartbeat.py vs torch.distributed.monitored_barrier (gloo), rank 1 stopped (SIGSTOP) ------

HEARTBEAT_RANK = """
import datetime, json, os, signal, time
import torch.distributed as dist
from shardtune.utils import heartbeat
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
beat = heartbeat.start(rank, 2)
dist.barrier()
if rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(heartbeat.SILENT_AFTER_S + 1.5)
t0 = time.perf_counter()
try:
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=2))
    theirs = "passed"
except RuntimeError as exc:
    theirs = str(exc).splitlines()[0][:160]
t1 = time.perf_counter()
ours = beat.silent_ranks(); stopped = beat.stopped_local_ranks(); t2 = time.perf_counter()
heartbeat.kill(stopped.values())
print(json.dumps(dict(theirs=theirs, theirs_s=t1 - t0, ours=ours, stopped=sorted(stopped), ours_s=t2 - t1)), flush=True)
os._exit(0)
"""


def bench_heartbeat() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", HEARTBEAT_RANK], env={**env, "RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for r in range(2)]
    try:
        out = json.loads(procs[0].communicate(timeout=120)[0].splitlines()[-1])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    print(f"  monitored_barrier (gloo only): {out['theirs_s']:.1f} s: {out['theirs']!r}")
    print(f"  shardtune heartbeat: {out['ours_s'] * 1000:.0f} ms: {out['ours']!r}; stopped on this host, SIGKILLed: "
          f"ranks {out['stopped']}")


# --- help: configs/help.py's layout vs argparse's HelpFormatter and rich-argparse, on the same field texts ---------

_BROKEN = re.compile(r"([\[(]-?(?:\d[\w.]*|inf),|\be\.g\.|\bi\.e\.)$")  # a line ending inside "[0, inf)" or after "e.g."


def _layout_faults(lines, width: int) -> str:
    over = sum(len(line) > width for line in lines)
    broken = sum(bool(_BROKEN.search(line.rstrip())) for line in lines)
    return f"{len(lines):4d} lines, {over} over {width} columns, {broken} broken inside an interval / after e.g."


def bench_help() -> None:
    import argparse
    from dataclasses import fields

    from shardtune.configs import help as shardtune_help
    from shardtune.configs.parse import _field_types
    from shardtune.configs.run import RunConfigs

    run = RunConfigs()

    def argparse_help(width: int, formatter=argparse.HelpFormatter) -> str:
        parser = argparse.ArgumentParser(prog="finetuning.py", add_help=False,
                                         formatter_class=lambda prog: formatter(prog, width=width))
        for name, cfg in run.by_name().items():
            group = parser.add_argument_group(name, shardtune_help._title(cfg))
            types = _field_types(cfg)
            for f in fields(cfg):
                group.add_argument(shardtune_help._flag_for(run, name, f.name),
                                   metavar=shardtune_help._type_text(types[f.name]),
                                   help=(shardtune_help._doc_text(cfg, f, True) + " (default: "
                                         + shardtune_help._default_text(getattr(cfg, f.name)) + ")").replace("%", "%%"))
        return parser.format_help()

    def ours(width: int) -> str:
        return "\n".join(line for name in run.by_name() for line in shardtune_help.format_config(run, name, width))

    rich_argparse = optional("rich_argparse")
    for width in (60, 80, 100):
        print(f"  width {width}, every field's whole help:")
        print(f"    shardtune help.format_config   {_layout_faults(ours(width).splitlines(), width)}, "
              f"{best_of(lambda: ours(width)) * 1000:.0f} ms")
        print(f"    argparse.HelpFormatter         {_layout_faults(argparse_help(width).splitlines(), width)}, "
              f"{best_of(lambda: argparse_help(width)) * 1000:.0f} ms")
        if rich_argparse is not None:
            text = argparse_help(width, rich_argparse.RichHelpFormatter)
            print(f"    rich_argparse.RichHelpFormatter {_layout_faults(text.splitlines(), width)}")


SECTIONS = {"help": bench_help, "heartbeat": bench_heartbeat, "trackers": bench_trackers, "atomic": bench_atomic, "cache": bench_cache, "sampler": bench_sampler, "packing": bench_packing, "loss": bench_loss, "optimizer": bench_optimizer}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(SECTIONS):
        print(f"== {name}")
        SECTIONS[name]()
