"""Helpers for tests/gpu: launching finetuning.py as users do, and the shared tiny-model builder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import save_llama  # noqa: F401 (tests/conftest.py: the shared tiny-model builder)

REPO = Path(__file__).resolve().parents[2]


def launch(args, out_dir: Path, nproc: int = 0, env: dict = None, timeout: float = 420) -> str:
    """finetuning.py as users start it: under torchrun with ``nproc`` processes, or plainly when nproc=0.
    Returns the combined output; fails the test with its tail when the run fails."""
    run_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SHARDTUNE_PG_TIMEOUT_S="120",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc else [sys.executable]
    cmd = [*launcher, str(REPO / "finetuning.py"), "--output_dir", str(out_dir), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def quick_flags(model_dir, **overrides) -> list:
    """3 steps of the bundled Alpaca sample in 128-token packed blocks, batch 2, no validation or saving."""
    flags = {"model_name": model_dir, "context_length": 128, "batch_size_training": 2, "num_epochs": 1,
             "max_train_step": 3, "run_validation": False, "save_model": False, "save_metrics": True,
             "num_workers_dataloader": 0, "lr": 1e-3}
    flags.update(overrides)
    return [x for k, v in flags.items() for x in (f"--{k}", v)]
