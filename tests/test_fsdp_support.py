"""Helpers shared by the FSDP, checkpoint and resume tests (this file holds no tests).

``run_ranks`` forks ``world`` worker processes from the (already imported) pytest process; each sets
the torchrun environment and calls ``shardtune.finetuning.main(**kwargs)`` in-process over gloo. That
costs about a second per 2-rank run instead of ~6 s for a torchrun subprocess. A process-group
timeout and a join deadline (both generous, see conftest.HANG_TIMEOUT_S) make a rank that dies or
hangs fail the test instead of hanging the session.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

import torch
import torch.multiprocessing as mp
from conftest import HANG_TIMEOUT_S

PG_TIMEOUT_S = "600"  # a collective waiting this long on a peer means the peer died (the product's default)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _worker(local_rank: int, world: int, port: int, kwargs: dict, result_dir: str, env: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(world), SHARDTUNE_PG_TIMEOUT_S=PG_TIMEOUT_S,
                      HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    os.environ.update(env)
    if world == 1:
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)  # a plain single-process run, as `python finetuning.py` would be
    torch.set_num_threads(1)
    log = open(Path(result_dir, f"rank{local_rank}.log"), "w", buffering=1)  # stdout + stderr, for asserts
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log  # pytest replaces sys.stdout with its own capture stream
    out = {"rank": local_rank}
    try:
        from shardtune.finetuning import main

        out["summary"] = main(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.flush()
    sys.stderr.flush()
    Path(result_dir, f"rank{local_rank}.json").write_text(json.dumps(out, default=str))


_WARM = False


def warm_imports() -> None:
    """Import the heavy modules once in the parent so that forked ranks start with them loaded."""
    global _WARM
    if _WARM:
        return
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import shardtune.finetuning  # noqa: F401
    import shardtune.model_checkpointing.checkpoint  # noqa: F401
    import shardtune.policies.fsdp  # noqa: F401
    import shardtune.training.loop  # noqa: F401
    _WARM = True


def run_ranks(world: int, kwargs: dict, result_dir: Path, *, timeout: float = HANG_TIMEOUT_S,
              env: Optional[dict] = None, expect_error: bool = False) -> List[dict]:
    """Run ``main(**kwargs)`` on ``world`` forked ranks; return each rank's result dict."""
    warm_imports()
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    for f in result_dir.glob("rank*.json"):
        f.unlink()
    _fork_and_join(_worker, (world, free_port(), kwargs, str(result_dir), env or {}), world, timeout)
    results = []
    for r in range(world):
        path = result_dir / f"rank{r}.json"
        log_text = (result_dir / f"rank{r}.log").read_text(errors="replace") if (result_dir / f"rank{r}.log").exists() \
            else ""
        if not path.exists():
            raise AssertionError(f"rank {r} died without a result; its log ends with:\n{log_text[-3000:]}")
        res = json.loads(path.read_text())
        res["log"] = log_text
        results.append(res)
    errors = [r for r in results if "error" in r]
    if errors and not expect_error:
        e = errors[0]
        raise AssertionError(f"rank {e['rank']} failed: {e['error']}\n{e['traceback']}\nlog:\n{e['log'][-3000:]}")
    return results


def _fork_and_join(worker, args: tuple, world: int, timeout: float) -> None:
    """Fork ``world`` ranks of ``worker(rank, *args)`` and wait; ranks still alive at the deadline are killed so
    that a hung collective cannot hang the test session."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world}-rank run of {worker.__name__} did not finish in {timeout}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)


def base_kwargs(model_dir, out_dir, **overrides) -> dict:
    """A short FSDP run on the bundled Alpaca sample: 128-token packed blocks, 3 steps, fp32; activation
    checkpointing stays at its default (on), as users get it."""
    kwargs = dict(model_name=str(model_dir), output_dir=str(out_dir), enable_fsdp=True, context_length=128,
                  batch_size_training=2, num_epochs=1, max_train_step=3, run_validation=False,
                  num_workers_dataloader=0, save_metrics=True, save_model=False, precision="fp32", lr=1e-3)
    kwargs.update(overrides)
    return kwargs


def step_losses(out_dir) -> List[float]:
    """train_step losses from every metrics_*.jsonl in out_dir, in step order."""
    from shardtune.observability.metrics import read_metrics

    records = sorted(read_metrics(out_dir, "train_step"), key=lambda r: r["step"])
    return [r["loss"] for r in records]


def first_trained_step(out_dir) -> int:
    """The first step the run that wrote summary.json trained (its own metrics file): step 1 for a fresh run,
    the checkpoint's step + 1 for a resumed one."""
    from shardtune.observability.metrics import read_metrics

    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    return min(r["step"] for r in read_metrics(summary["metrics_file"], "train_step"))


def log_line(text: str, key: str) -> str:
    """The one line of a run's output that holds ``key`` (a key word such as "activation checkpointing"), for
    tests that check a logged decision by its numbers and key words rather than by its wording."""
    lines = [ln for ln in text.splitlines() if key in ln]
    assert len(lines) == 1, f"{len(lines)} lines hold {key!r}:\n" + "\n".join(lines or text.splitlines()[-30:])
    return lines[0]


def ac_decision(log: str) -> str:
    """What a run logged about activation checkpointing: "off", or "on for 2 of 2 decoder layers (why)". Its own
    line in a single process; a clause of the "--> FSDP2" line under FSDP."""
    line = log_line(log, "activation checkpointing")
    return line.split("activation checkpointing", 1)[1].split(";")[0].strip()


def _fn_worker(local_rank: int, world: int, port: int, fn, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(local_rank))
    torch.set_num_threads(1)
    import datetime

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(PG_TIMEOUT_S)))
    try:
        out = {"rank": local_rank, "result": fn(local_rank, world)}
    except Exception as exc:  # noqa: BLE001
        out = {"rank": local_rank, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    Path(result_dir, f"fn_rank{local_rank}.json").write_text(json.dumps(out, default=str))


def run_fn_ranks(fn, world: int, result_dir: Path, timeout: float = HANG_TIMEOUT_S) -> list:
    """Run ``fn(rank, world)`` on ``world`` forked gloo ranks; return each rank's (JSON-able) result."""
    warm_imports()
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    _fork_and_join(_fn_worker, (world, free_port(), fn, str(result_dir)), world, timeout)
    results = [json.loads((result_dir / f"fn_rank{r}.json").read_text()) for r in range(world)]
    for r in results:
        if "error" in r:
            raise AssertionError(f"rank {r['rank']} failed: {r['error']}\n{r['traceback']}")
    return [r["result"] for r in results]
