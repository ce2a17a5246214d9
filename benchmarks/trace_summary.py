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
    for k in kernels:
        if is_nccl(k):
            by_name[k["name"][:40]] = by_name.get(k["name"][:40], 0) + k["dur"]
    return "\n".join([
        f"{path.split('/')[-1][:40]}: {n} steps, window {ms(t1 - t0):.1f} ms/step; compute {ms(length(compute)):.1f}; "
        f"nccl {ms(length(nccl)):.1f} (exposed {ms(exposed):.1f}); idle {ms(t1 - t0 - length(busy)):.1f} ms/step",
        "   largest idle gaps (ms, at ms): " + str([(round(g / 1e3, 2), round(at / 1e3, 1)) for g, at in gaps]),
        "   nccl kernels ms/step: "
        + str({k: round(ms(v), 1) for k, v in sorted(by_name.items(), key=lambda x: -x[1])[:4]}),
    ])


if __name__ == "__main__":
    for trace in sys.argv[1:]:
        print(summarise(trace))
