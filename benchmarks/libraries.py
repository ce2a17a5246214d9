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
        seconds = best_of(run, repeat=3)
        mem = peak_rss_growth_mb(LOSS_SETUP.format(n=n, h=h, v=v) + "GO\n" + f"({expr}).backward()")
        print(f"  {name:32s} loss rel err {abs(float(loss) - float(ref)) / float(ref):.1e}  grad max err {err:.1e}  "
              f"{seconds * 1000:7.0f} ms  peak +{mem:5.0f} MiB")
    # bf16 compute (what a bf16_mixed run does on a GPU), against the fp64 reference. Ours follows autocast; torch's
    # ignores it (computes in the inputs' dtype), so a switch would cast its inputs to bf16 itself.
    cast = "torch F.linear_cross_entropy, inputs cast to bf16"
    LOSS_VARIANTS[cast] = LOSS_VARIANTS["torch F.linear_cross_entropy"].replace("(hidden, weight,", \
        "(hidden.bfloat16(), weight.bfloat16(),")
    for name in ("shardtune chunked", "torch F.linear_cross_entropy", cast):
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
        seconds = best_of(lambda: eval(expr, scope).backward(), repeat=3)
        print(f"  {name:32s} frozen head: {seconds * 1000:7.0f} ms")
    liger = optional("liger_kernel.transformers")
    if liger is None:
        print("  liger-kernel: Triton kernels, CUDA only: not measured here")


SECTIONS = {"loss": bench_loss}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(SECTIONS):
        print(f"== {name}")
        SECTIONS[name]()
