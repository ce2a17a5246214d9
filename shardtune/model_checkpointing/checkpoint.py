"""Resumable checkpoints: save, find, prune and load.

Layout (never built from the model name)::

    <dist_checkpoint_root_folder or <output_dir>/checkpoints>/<dist_checkpoint_folder>/
        step_000120/                 one checkpoint; the name is the optimizer step it was taken after
            state.json               TrainState + what was saved; written last (a folder without it is
                                     incomplete and never resumed from)
            run_config.yaml          the run's resolved config (the converter rebuilds the model from it)
            trainer_state.pt         LR scheduler and gradient-scaler state
            rng/rank_00000.pt ...    RNG states (torch, CUDA, Python, NumPy), one file per rank
            SHARDED_STATE_DICT:  model + optimizer via torch.distributed.checkpoint
                                 (.metadata, __<rank>_0.distcp): each rank writes its own shards
            FULL_STATE_DICT:     model/ a Hugging Face folder (or a PEFT adapter folder) in the
                                 training dtype, and optimizer.pt, both gathered on rank 0
        best.json                    which checkpoint had the best eval loss (never pruned)

Writes are atomic: every rank writes into ``.tmp-step_000120``; after a barrier rank 0 renames it.
Frozen parameters (a PEFT run's base model, --freeze_layers) are not stored in sharded checkpoints;
they come from --model_name again on resume, exactly as at the start of the run.

Resuming restores model, optimizer, LR scheduler, gradient scaler, TrainState (step, epoch, batches
already consumed in the epoch, best eval loss, tokens) and the RNG streams. The data order needs no
state: samplers are deterministic given (seed, epoch), and the loop skips ``batches_in_epoch``.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from shardtune.configs.fsdp import StateDictType
from shardtune.utils import distributed
from shardtune.utils.config_utils import ConfigError, RunConfigs
from shardtune.utils.io import TMP_MARKER, atomic_write_text, replace_directory
from shardtune.utils.logging import log, warn

STATE_FILE = "state.json"
BEST_FILE = "best.json"
STEP_PREFIX = "step_"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Where checkpoints live
# ---------------------------------------------------------------------------------------------
def checkpoint_root(run: RunConfigs) -> Path:
    t = run.train
    root = Path(t.dist_checkpoint_root_folder) if t.dist_checkpoint_root_folder else Path(t.output_dir) / "checkpoints"
    return root / t.dist_checkpoint_folder


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(TMP_MARKER) and (path / STATE_FILE).is_file()


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def list_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under ``root``, oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: read_state(p)["train_state"]["step"])


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to resume from, and where its model weights come from."""

    path: Path
    checkpoint_type: StateDictType
    info: dict

    @property
    def model_dir(self) -> Optional[Path]:
        """FULL_STATE_DICT, full fine-tuning: the checkpoint's HF folder replaces --model_name."""
        if self.checkpoint_type is StateDictType.FULL_STATE_DICT and not self.info.get("use_peft"):
            return self.path / "model"
        return None

    @property
    def adapter_dir(self) -> Optional[Path]:
        """FULL_STATE_DICT, PEFT: the checkpoint's adapter folder replaces --from_peft_checkpoint."""
        if self.checkpoint_type is StateDictType.FULL_STATE_DICT and self.info.get("use_peft"):
            return self.path / "model"
        return None


def find_resume_point(run: RunConfigs) -> Optional[ResumePoint]:
    """--resume_from DIR | auto -> the checkpoint to resume from (None: start fresh). Checks run before
    any weights are read; errors are one-line ConfigErrors."""
    value = run.train.resume_from.strip()
    if not value:
        return None
    if value == "auto":
        root = checkpoint_root(run)
        path = latest_checkpoint(root)
        if path is None:
            log(f"--> --resume_from auto: no complete checkpoint in {root}; starting from scratch")
            return None
    else:
        path = Path(value)
        if path.is_dir() and not (path / STATE_FILE).is_file():
            latest = latest_checkpoint(path)  # a checkpoint root was given: take its newest
            path = latest if latest is not None else path
        if not is_complete(path):
            raise ConfigError(f"--resume_from: {value} is not a complete checkpoint (a folder with {STATE_FILE}, "
                              f"e.g. {checkpoint_root(run) / step_dir_name(100)}), or use --resume_from auto")
    info = read_state(path)
    if info.get("format") != FORMAT_VERSION:
        raise ConfigError(f"--resume_from: {path} has checkpoint format {info.get('format')!r}; this version "
                          f"reads format {FORMAT_VERSION}")
    if bool(info.get("use_peft")) != bool(run.train.use_peft):
        raise ConfigError(f"--resume_from: {path} was saved {'with' if info.get('use_peft') else 'without'} "
                          f"--use_peft; resume with the same setting")
    ckpt_type = StateDictType[info["checkpoint_type"]]
    log(f"--> resuming from {path} (step {info['train_state']['step']}, {ckpt_type.name})")
    return ResumePoint(path, ckpt_type, info)


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """Every RNG this process draws from. Stored as tensors and lists (loadable with weights_only)."""
    py = random.getstate()
    state = {"python": [py[0], list(py[1]), py[2]], "torch": torch.get_rng_state(), "cuda": None, "numpy": None}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------
def _process_group() -> bool:
    """Whether collectives are available (single-process runs use DCP without a process group)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every save/load without a process group; for one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _strip_prefix(state_dict: dict, prefix: str = "lm.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


class Checkpointer:
    """Saves and restores everything a run needs to continue, for FSDP and single-process runs alike.

    model: the training model (CausalLMWithLoss, sharded or not); lm: the transformers model or
    PeftModel inside it (used for save_pretrained); export_dtype: the dtype the final exported model
    is written in (the base checkpoint's).
    """

    def __init__(self, run: RunConfigs, model: nn.Module, lm: nn.Module, optimizer, lr_scheduler, scaler=None,
                 tokenizer=None, export_dtype: Optional[torch.dtype] = None):
        self.run, self.model, self.lm = run, model, lm
        self.optimizer, self.lr_scheduler, self.scaler = optimizer, lr_scheduler, scaler
        self.tokenizer, self.export_dtype = tokenizer, export_dtype
        self.info = distributed.info()
        self.root = checkpoint_root(run)
        self.is_peft = hasattr(lm, "peft_config")
        self.checkpoint_type = run.fsdp.checkpoint_type
        self._saved: dict = {}  # step -> folder written by this run

    # ---- the train loop's hook -------------------------------------------------------------
    def __call__(self, state, reason: str) -> None:
        """TrainContext.save_checkpoint: reason 'step' (every --save_every_n_steps), 'epoch' or 'best'."""
        t = self.run.train
        if reason == "step":
            self.save(state)
            return
        # End of an epoch: a resumable checkpoint unless this step has one already (a step checkpoint
        # taken mid-loop is the exact state; after evaluation the RNG has moved on), then the export.
        path = self._saved.get(state.step) or self.save(state)
        if reason == "best" and t.run_validation:
            self.mark_best(path, state.best_eval_loss)
        if reason == "best" or not t.run_validation:
            self.export(Path(t.output_dir) / "model")

    # ---- saving -----------------------------------------------------------------------------
    def save(self, state) -> Path:
        """Write a resumable checkpoint for ``state`` (collective: every rank calls it)."""
        start = time.perf_counter()
        final = self.root / step_dir_name(state.step)
        tmp = self.root / f"{TMP_MARKER}{final.name}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        distributed.barrier()

        if self.checkpoint_type is StateDictType.SHARDED_STATE_DICT:
            self._save_sharded(tmp)
        else:
            self._save_full(tmp)
        torch.save(rng_state(self.info.device), tmp / "rng" / f"rank_{self.info.rank:05d}.pt")

        if self.info.is_main:
            trainer = {"lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                       "scaler": self.scaler.state_dict() if self.scaler is not None else None}
            torch.save(trainer, tmp / "trainer_state.pt")
            from shardtune.utils.config_utils import save_resolved

            save_resolved(self.run, tmp / "run_config.yaml")
            t = self.run.train
            info = {"format": FORMAT_VERSION, "checkpoint_type": self.checkpoint_type.name,
                    "train_state": state.to_dict(), "world_size": self.info.world_size,
                    "model_name": t.model_name, "use_peft": bool(t.use_peft),
                    "peft_method": t.peft_method if t.use_peft else None,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_text(tmp / STATE_FILE, json.dumps(info, indent=2) + "\n")  # last: marks it complete
        distributed.barrier()
        if self.info.is_main:
            replace_directory(tmp, final)
            self.prune()
        distributed.barrier()
        log(f"--> checkpoint ({self.checkpoint_type.name}) saved to {final} in {time.perf_counter() - start:.1f}s")
        self._saved[state.step] = final
        return final

    def _save_sharded(self, tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        with quiet_single_process():
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), no_dist=not _process_group())

    def _save_full(self, tmp: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        msd = self.gather_full_model_state()
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=self._full_options())
        if self.info.is_main:
            from shardtune.model_checkpointing.export import export_pretrained

            export_pretrained(self.lm, self.tokenizer, tmp / "model", state_dict=msd)  # training dtype: exact
            torch.save(osd, tmp / "optimizer.pt")

    def _full_options(self, ignore_frozen: bool = False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # cpu_offload: gathered tensors land in host memory, on rank 0 only (needs a process group)
        return StateDictOptions(full_state_dict=True, cpu_offload=self.info.distributed,
                                ignore_frozen_params=ignore_frozen)

    def gather_full_model_state(self) -> dict:
        """The full model state dict in the lm's key names, on rank 0 ({} elsewhere). Collective.
        PEFT runs gather only the trainable (adapter) weights."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.model, options=self._full_options(ignore_frozen=self.is_peft))
        return _strip_prefix(sd) if self.info.is_main else {}

    def export(self, out_dir: Path) -> None:
        """The deliverable: a Hugging Face folder in the base model's dtype, or a PEFT adapter folder."""
        sd = self.gather_full_model_state()
        if self.info.is_main:
            from shardtune.model_checkpointing.export import export_pretrained

            out = export_pretrained(self.lm, self.tokenizer, out_dir, state_dict=sd,
                                    dtype=None if self.is_peft else self.export_dtype)
            log(f"--> saved {'adapter' if self.is_peft else 'model'} to {out}")
        distributed.barrier()

    def mark_best(self, path: Path, eval_loss: float) -> None:
        if self.info.is_main:
            atomic_write_text(self.root / BEST_FILE, json.dumps({"checkpoint": path.name, "eval_loss": eval_loss})
                              + "\n")
        distributed.barrier()

    def best_name(self) -> Optional[str]:
        try:
            return json.loads((self.root / BEST_FILE).read_text(encoding="utf-8"))["checkpoint"]
        except (OSError, ValueError, KeyError):
            return None

    def prune(self) -> None:
        """Keep the newest --keep_last_n_checkpoints and the best one; drop leftovers of crashed writes."""
        keep_n = self.run.train.keep_last_n_checkpoints
        found = list_checkpoints(self.root)
        best = self.best_name()
        for path in found[:-keep_n] if keep_n else []:
            if path.name != best:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.iterdir():
            if path.name.startswith(f"{TMP_MARKER}{STEP_PREFIX}"):
                shutil.rmtree(path, ignore_errors=True)

    # ---- loading ----------------------------------------------------------------------------
    def load(self, point: ResumePoint) -> "tuple":
        """Restore model, optimizer, scheduler, scaler and RNG from ``point``.

        Returns (TrainState, restore_rng): restore_rng is None when the RNG was restored already,
        or a function the training loop calls once it has created the epoch's data iterator (creating
        it draws a seed from the global RNG, as it did in the uninterrupted run before this checkpoint).
        """
        from shardtune.utils.train_utils import TrainState

        start = time.perf_counter()
        path = point.path
        if point.checkpoint_type is StateDictType.SHARDED_STATE_DICT:
            self._load_sharded(path)
        else:
            self._load_full_optimizer(path)  # the weights came in through --model_name / the adapter

        trainer = torch.load(path / "trainer_state.pt", weights_only=True)
        if self.lr_scheduler is not None and trainer.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
        if self.scaler is not None and trainer.get("scaler") is not None:
            self.scaler.load_state_dict(trainer["scaler"])

        known = {f.name for f in fields(TrainState)}
        state = TrainState(**{k: v for k, v in point.info["train_state"].items() if k in known})
        rng_file = path / "rng" / f"rank_{self.info.rank:05d}.pt"
        restore_rng: Optional[Callable[[], None]] = None
        if rng_file.is_file():
            saved = torch.load(rng_file, weights_only=True)
            restore_rng = lambda: set_rng_state(saved, self.info.device)  # noqa: E731
        else:
            warn(f"{path} has no RNG state for rank {self.info.rank} (saved with {point.info.get('world_size')} "
                 f"ranks); random streams (dropout) will differ from the uninterrupted run")
        if restore_rng is not None and state.batches_in_epoch == 0:
            restore_rng()  # at an epoch boundary: the next epoch's iterator has not drawn its seed yet
            restore_rng = None
        log(f"--> restored step {state.step} (epoch {state.epoch + 1}, {state.batches_in_epoch} batches into it) "
            f"in {time.perf_counter() - start:.1f}s")
        return state, restore_rng

    def _load_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        expected = set(msd)
        target = {"model": msd, "optim": osd}
        with quiet_single_process():
            dcp.load(target, checkpoint_id=str(path), no_dist=not _process_group())
        result = set_state_dict(self.model, self.optimizer, model_state_dict=target["model"],
                                optim_state_dict=target["optim"],
                                options=StateDictOptions(ignore_frozen_params=True, strict=False))
        missing = set(getattr(result, "missing_keys", []) or []) & expected
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks trainable weights: {sorted(missing)[:3]}...")

    def _load_full_optimizer(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        osd = torch.load(path / "optimizer.pt", weights_only=True) if self.info.is_main else {}
        sharded = self.info.world_size > 1
        set_optimizer_state_dict(self.model, self.optimizer, osd,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded))
