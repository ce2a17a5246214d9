"""Where a GPU step's time goes, from torch.profiler traces (``--use_profiler``; chrome-trace JSON, optionally .gz).

Per recorded step: the time any compute kernel runs (the union over streams), the time NCCL kernels run and
the part of it no compute kernel overlaps (exposed communication), and the idle time when no kernel runs at all;
then the largest idle gaps and the NCCL kernels by time. Comparing a 1-GPU and a 2-GPU trace of the same run
shows what scaling costs (benchmarks/results/scaling_profile_h200x2_s4_callD.md).

    python3 benchmarks/trace_summary.py OUTPUT_DIR/profiler/rank*.pt.trace.json
"""
from __future__ import annotations

import gzip
import json
import re
import sys
from typing import List, Tuple

Intervals = List[Tuple[float, float]]


def union(intervals) -> Intervals:
    out: list = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(x) for x in out]


def length(intervals: Intervals) -> float:
    return sum(end - start for start, end in intervals)


def intersection(a: Intervals, b: Intervals) -> Intervals:
    i = j = 0
    out = []
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def summarise(path: str) -> str:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    steps = [e for e in events if e.get("ph") == "X" and re.fullmatch(r"ProfilerStep#\d+", e.get("name", ""))
             and e.get("cat") in ("user_annotation", "cpu_op", "python_function")]
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kernels:
        return f"{path}: no GPU kernels"
    span = lambda k: (k["ts"], k["ts"] + k["dur"])  # noqa: E731 - microseconds
    is_nccl = lambda k: "nccl" in k["name"].lower()  # noqa: E731
    nccl = union(span(k) for k in kernels if is_nccl(k))
    compute = union(span(k) for k in kernels if not is_nccl(k))
    busy = union(span(k) for k in kernels)
    t0, t1 = busy[0][0], busy[-1][1]
    n = max(1, len(steps))
    ms = lambda us: us / n / 1e3  # noqa: E731 - per step, in ms
    exposed = length(nccl) - length(intersection(nccl, compute))
    gaps = sorted(((busy[i + 1][0] - busy[i][1], busy[i][1] - t0) for i in range(len(busy) - 1)), reverse=True)[:6]
    by_name: dict = {}
    by_family: dict = {}
    for k in kernels:
        if is_nccl(k):
            by_name[k["name"][:40]] = by_name.get(k["name"][:40], 0) + k["dur"]
        else:
            by_family[family(k["name"])] = by_family.get(family(k["name"]), 0) + k["dur"]
    # The exposed stretches of communication, each with what ran: where in the step they fall.
    exposed_at = []
    for start, end in nccl:
        covered = length(intersection([(start, end)], compute))
        if end - start - covered > 300:  # > 0.3 ms uncovered
            names = {k["name"][:30] for k in kernels if is_nccl(k) and k["ts"] < end and k["ts"] + k["dur"] > start}
            exposed_at.append((round((end - start - covered) / 1e3, 2), round((start - t0) / 1e3, 1), sorted(names)))
    return "\n".join([
        f"{path.split('/')[-1][:40]}: {n} steps, window {ms(t1 - t0):.1f} ms/step; compute {ms(length(compute)):.1f}; "
        f"nccl {ms(length(nccl)):.1f} (exposed {ms(exposed):.1f}); idle {ms(t1 - t0 - length(busy)):.1f} ms/step",
        "   largest idle gaps (ms, at ms): " + str([(round(g / 1e3, 2), round(at / 1e3, 1)) for g, at in gaps]),
        "   nccl kernels ms/step: "
        + str({k: round(ms(v), 1) for k, v in sorted(by_name.items(), key=lambda x: -x[1])[:4]}),
        "   compute kernels ms/step (summed, by family): "
        + str({k: round(ms(v), 1) for k, v in sorted(by_family.items(), key=lambda x: -x[1])}),
        "   exposed communication (ms uncovered, at ms, kernels): "
        + str(sorted(exposed_at, reverse=True)[:8]),
    ])


def family(name: str) -> str:
    """A compute kernel's kind, to see which kinds slow down when communication shares the GPU."""
    low = name.lower()
    for fam, keys in (("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas")),
                      ("attention", ("flash", "fmha", "attn")),
                      ("triton", ("triton",)), ("optimizer", ("adam", "foreach", "multi_tensor")),
                      ("copy", ("copy", "memcpy", "memset", "cat", "split", "chunk"))):
        if any(k in low for k in keys):
            return fam
    return "other"


if __name__ == "__main__":
    for trace in sys.argv[1:]:
        print(summarise(trace))
