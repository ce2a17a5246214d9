"""Summarise torch.profiler chrome traces: per step, GPU time in compute kernels, in NCCL kernels, NCCL not
overlapped by compute, and idle time (no kernel at all). Usage: python trace_summary.py TRACE.json[.gz] ..."""
import gzip, json, sys, re


def union(iv):
    iv = sorted(iv); out = []
    for s, e in iv:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def total(iv):
    return sum(e - s for s, e in iv)


def intersect(a, b):
    i = j = 0; out = []
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append([s, e])
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


for path in sys.argv[1:]:
    op = gzip.open if path.endswith(".gz") else open
    ev = json.load(op(path, "rt"))["traceEvents"]
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("ph") == "X" and re.match(r"ProfilerStep#\d+", e.get("name", "")) and e.get("cat") in ("user_annotation", "cpu_op", "python_function"))
    kern = [e for e in ev if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kern:
        print(path, "no kernels"); continue
    t0 = min(k["ts"] for k in kern); t1 = max(k["ts"] + k["dur"] for k in kern)
    nccl = union([(k["ts"], k["ts"] + k["dur"]) for k in kern if "nccl" in k["name"].lower()])
    comp = union([(k["ts"], k["ts"] + k["dur"]) for k in kern if "nccl" not in k["name"].lower()])
    allk = union([(k["ts"], k["ts"] + k["dur"]) for k in kern])
    n = max(1, len(steps))
    win = t1 - t0
    exposed = total(nccl) - total(intersect(nccl, comp))
    print(f"{path.split('/')[-1][:40]}: {n} steps, window {win/n/1e3:.1f} ms/step; compute {total(comp)/n/1e3:.1f}; "
          f"nccl {total(nccl)/n/1e3:.1f} (exposed {exposed/n/1e3:.1f}); idle {(win-total(allk))/n/1e3:.1f} ms/step")
    # biggest idle gaps
    gaps = sorted(((allk[i+1][0] - allk[i][1]), allk[i][1] - t0) for i in range(len(allk) - 1))[-6:]
    print("   largest idle gaps (ms, at ms):", [(round(g/1e3, 2), round(at/1e3, 1)) for g, at in reversed(gaps)])
    names = {}
    for k in kern:
        if "nccl" in k["name"].lower():
            key = k["name"][:40]; names[key] = names.get(key, 0) + k["dur"]
    print("   nccl kernels ms/step:", {k: round(v/n/1e3, 1) for k, v in sorted(names.items(), key=lambda x: -x[1])[:4]})
