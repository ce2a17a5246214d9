"""Where checkpoints live and what their files are called; listing, reading the progress record, pruning.

Layout (never built from the model name)::

    <dist_checkpoint_root_folder or <output_dir>/checkpoints>/<dist_checkpoint_folder>/
        step_000120/                 one checkpoint; the name is the optimizer step it was taken after
            state.json               progress (TrainState), LR scheduler, gradient scaler, run id, data
                                     layout, whether its weights are the run's export
            run_config.yaml          the run's resolved config (the converter rebuilds the model from it)
            rng/rank_00000.pt ...    RNG states (torch, CUDA, Python, NumPy), one file per rank
            SHARDED_STATE_DICT:  trainable weights + optimizer via torch.distributed.checkpoint
                                 (.metadata, __<rank>_0.distcp): each rank writes its own shards
            FULL_STATE_DICT:     model/ a Hugging Face folder (or a PEFT adapter folder) in the
                                 training dtype, and the optimizer state: optimizer*.safetensors +
                                 optimizer.json (optimizer_state.py); both gathered tensor by tensor and
                                 written by rank 0 (older checkpoints: optimizer.pt)
            manifest.json            size and CRC-32 of every other file; written last (integrity.py)
        best.json                    which checkpoint had the best eval loss (never pruned)
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import List, Optional

from shardtune.configs.run import RunConfigs
from shardtune.errors import first_line
from shardtune.utils.io import TMP_MARKER, atomic_write_text
from shardtune.utils.logging import warn

STATE_FILE = "state.json"
RUN_CONFIG_FILE = "run_config.yaml"
BEST_FILE = "best.json"
RNG_DIR = "rng"
STEP_PREFIX = "step_"
FORMAT_VERSION = 3          # what this version writes (state.json "format"): manifest.json over every file and
#                             the data position as samples consumed by all ranks (resumable on any world size)
READABLE_FORMATS = (1, 2, 3)  # 1: checksums.json over the weight, optimizer and RNG files only (integrity.py);
#                               1-2: the position in per-rank batches (resumed on the saved layout only)


def checkpoint_root(run: RunConfigs) -> Path:
    t = run.train
    root = Path(t.dist_checkpoint_root_folder) if t.dist_checkpoint_root_folder else Path(t.output_dir) / "checkpoints"
    return root / t.dist_checkpoint_folder


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def step_of(path: Path) -> Optional[int]:
    """The step a checkpoint folder's name says it was taken after (None: not a step_* name)."""
    digits = Path(path).name[len(STEP_PREFIX):]
    return int(digits) if Path(path).name.startswith(STEP_PREFIX) and digits.isdigit() else None


def rng_file(folder: Path, rank: int) -> Path:
    return Path(folder) / RNG_DIR / f"rank_{rank:05d}.pt"


def list_checkpoint_dirs(root: Path) -> List[Path]:
    """Every step_* folder under ``root``, complete, damaged or not, oldest first (by the step in its name)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: (step_of(p), p.name))


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def try_read_state(path: Path):
    """(state dict, "") or (None, one line naming state.json and why it is unusable)."""
    try:
        info = read_state(path)
        int(info["train_state"]["step"])
        return info, ""
    except FileNotFoundError:
        return None, f"{Path(path) / STATE_FILE}: missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{Path(path) / STATE_FILE}: unreadable ({type(exc).__name__}: {first_line(exc)})"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(TMP_MARKER) and try_read_state(path)[0] is not None


def list_checkpoints(root: Path, run_id: Optional[str] = None) -> List[Path]:
    """Checkpoints under ``root`` whose state.json reads, oldest first (by step); with ``run_id``, only that
    run's. (Whether they are intact is integrity.py's question, asked before one is resumed.)"""
    found = []
    for path in list_checkpoint_dirs(root):
        info, _ = try_read_state(path)
        if info is not None and (run_id is None or info.get("run_id") in (None, run_id)):
            found.append((info["train_state"]["step"], path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


# What decides an epoch's sample order, into which the data position (TrainState.samples_in_epoch) counts: a run
# resumed mid-epoch must keep these. The world size, the batch size and gradient accumulation may change.
ORDER_KEYS = ("dataset", "seed", "context_length", "batching_strategy")


def data_layout(run: RunConfigs, world_size: int) -> dict:
    """What decides which samples the first ``batches_in_epoch`` batches of an epoch held, on each rank."""
    t = run.train
    return {"world_size": world_size, "batch_size_training": t.batch_size_training,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "context_length": t.context_length,
            "batching_strategy": t.batching_strategy, "dataset": t.dataset, "seed": t.seed}


# ---------------------------------------------------------------------------------------------
# The best checkpoint, and pruning (rank 0)
# ---------------------------------------------------------------------------------------------
def mark_best(root: Path, path: Path, eval_loss: float) -> None:
    atomic_write_text(Path(root) / BEST_FILE, json.dumps({"checkpoint": Path(path).name, "eval_loss": eval_loss})
                      + "\n")


def best_name(root: Path) -> Optional[str]:
    try:
        return json.loads((Path(root) / BEST_FILE).read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune(root: Path, run_id: Optional[str], keep_n: int) -> None:
    """Keep exactly the newest ``keep_n`` checkpoints of this run, plus the best one (0: keep all)."""
    found = list_checkpoints(root, run_id)
    best = best_name(root)
    for path in found[:-keep_n] if keep_n else []:
        if path.name != best:
            remove_tree(path)


def remove_tree(path: Path) -> bool:
    """Delete a folder (or file) so that no half-deleted copy can be mistaken for a whole one: it is renamed
    to a temporary name first. Failures are reported, not hidden. Returns whether it is gone."""
    path = Path(path)
    if not path.exists():
        return True
    doomed = path
    if not path.name.startswith(TMP_MARKER):
        doomed = path.with_name(f"{TMP_MARKER}del-{uuid.uuid4().hex[:8]}-{path.name}")
        try:
            os.rename(path, doomed)
        except OSError as exc:
            warn(f"could not remove {path}: {exc.strerror}")
            return False
    errors = []
    if doomed.is_dir():
        shutil.rmtree(doomed, onerror=lambda fn, p, exc: errors.append(f"{p}: {exc[1]}"))
    else:
        try:
            doomed.unlink()
        except OSError as exc:
            errors.append(f"{doomed}: {exc.strerror}")
    if errors:
        warn(f"could not fully remove {path} (now {doomed}): {errors[0]}")
    return not errors
