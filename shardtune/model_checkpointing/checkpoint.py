"""Resumable checkpoints: save, verify, find, prune and load.

Layout (never built from the model name)::

    <dist_checkpoint_root_folder or <output_dir>/checkpoints>/<dist_checkpoint_folder>/
        step_000120/                 one checkpoint; the name is the optimizer step it was taken after
            state.json               progress (TrainState), LR scheduler, gradient scaler, run id, data
                                     layout, whether its weights are the run's export; written last (a
                                     folder without it is incomplete and never resumed from)
            checksums.json           size and CRC-32 of every other file, verified before resuming
            run_config.yaml          the run's resolved config (the converter rebuilds the model from it)
            rng/rank_00000.pt ...    RNG states (torch, CUDA, Python, NumPy), one file per rank
            SHARDED_STATE_DICT:  trainable weights + optimizer via torch.distributed.checkpoint
                                 (.metadata, __<rank>_0.distcp): each rank writes its own shards
            FULL_STATE_DICT:     model/ a Hugging Face folder (or a PEFT adapter folder) in the
                                 training dtype, and optimizer.pt, both gathered on rank 0
        best.json                    which checkpoint had the best eval loss (never pruned)

Writes are atomic: every rank writes into ``.tmp-step_000120``; after a barrier rank 0 renames it.
What is written is checked when it is written (every trained tensor is in the files; the weights are
finite), and a checkpoint is verified against its checksums before it is resumed: ``--resume_from
auto`` skips damaged ones, with a warning naming the file, and takes the newest intact one.
Frozen parameters (a PEFT run's base model, --freeze_layers) are not stored in sharded checkpoints;
they come from --model_name again on resume, exactly as at the start of the run.

Resuming restores model, optimizer, LR scheduler, gradient scaler, TrainState (step, epoch, batches
already consumed in the epoch, best eval loss, tokens) and the RNG streams. The data order needs no
state: samplers are deterministic given (seed, epoch), and the loop skips ``batches_in_epoch``; so a
checkpoint taken mid-epoch is only resumed with the same data layout (world size, batch sizes, ...).
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from shardtune.configs.fsdp import StateDictType
from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError, SaveError, first_line
from shardtune.model_checkpointing import integrity
from shardtune.model_checkpointing.export import canonical_name, export_pretrained, is_peft_model, read_export_info
from shardtune.utils import distributed
from shardtune.utils.distributed import DistInfo
from shardtune.utils.io import TMP_MARKER, atomic_write_text, replace_directory
from shardtune.utils.logging import log, warn
from shardtune.utils.rng import rng_state, set_rng_state

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


def list_checkpoint_dirs(root: Path) -> List[Path]:
    """Every step_* folder under ``root``, complete or not."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def try_read_state(path: Path):
    """(state dict, "") or (None, why it is unusable)."""
    try:
        info = read_state(path)
        int(info["train_state"]["step"])
        return info, ""
    except FileNotFoundError:
        return None, f"{Path(path) / STATE_FILE} is missing (an incomplete save)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{Path(path) / STATE_FILE} is unreadable ({type(exc).__name__}: {first_line(exc)})"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(TMP_MARKER) and try_read_state(path)[0] is not None


def list_checkpoints(root: Path, run_id: Optional[str] = None) -> List[Path]:
    """Complete checkpoints under ``root``, oldest first (by step); with ``run_id``, only that run's."""
    found = []
    for path in list_checkpoint_dirs(root):
        info, _ = try_read_state(path)
        if info is not None and (run_id is None or info.get("run_id") in (None, run_id)):
            found.append((info["train_state"]["step"], path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def data_layout(run: RunConfigs, world_size: int) -> dict:
    """What decides which samples the first ``batches_in_epoch`` batches of an epoch held, on each rank."""
    t = run.train
    return {"world_size": world_size, "batch_size_training": t.batch_size_training,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "context_length": t.context_length,
            "batching_strategy": t.batching_strategy, "dataset": t.dataset, "seed": t.seed}


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

    @property
    def step(self) -> int:
        return int(self.info["train_state"]["step"])


def _resume_candidates(run: RunConfigs, run_id: Optional[str]) -> List[str]:
    """Rank 0: the checkpoints --resume_from may use, newest first (explicit: exactly one)."""
    value = run.train.resume_from.strip()
    if value == "auto":
        root = checkpoint_root(run)
        mine = list_checkpoints(root, run_id)
        others = len(list_checkpoints(root)) - len(mine)
        if others:
            log(f"--> --resume_from auto: ignoring {others} checkpoint(s) in {root} of other runs")
        if not mine:
            log(f"--> --resume_from auto: no complete checkpoint in {root}; starting from scratch")
        return [str(p) for p in reversed(mine)]
    path = Path(value)
    if path.is_dir() and not (path / STATE_FILE).is_file() and list_checkpoints(path):
        path = list_checkpoints(path)[-1]  # a checkpoint root was given: take its newest
    info, why = try_read_state(path) if path.is_dir() else (None, "")
    if info is None:
        raise ConfigError(f"--resume_from: {value} is not a complete checkpoint"
                          + (f" ({why})" if why and path.is_dir() else "")
                          + f" (a folder with {STATE_FILE}, e.g. {checkpoint_root(run) / step_dir_name(100)}), or use "
                          f"--resume_from auto")
    return [str(path)]


def _check_compatible(run: RunConfigs, path: Path, info: dict, world_size: int) -> None:
    """One-line errors for a checkpoint this run cannot continue exactly."""
    if info.get("format") != FORMAT_VERSION:
        raise ConfigError(f"--resume_from: {path} has checkpoint format {info.get('format')!r}; this version "
                          f"reads format {FORMAT_VERSION}")
    if bool(info.get("use_peft")) != bool(run.train.use_peft):
        raise ConfigError(f"--resume_from: {path} was saved {'with' if info.get('use_peft') else 'without'} "
                          f"--use_peft; resume with the same setting")
    saved, now = info.get("data_layout"), data_layout(run, world_size)
    if info["train_state"].get("batches_in_epoch", 0) and saved is not None and saved != now:
        diff = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k])
        raise ConfigError(f"--resume_from: {path} was taken {info['train_state']['batches_in_epoch']} batches into an "
                          f"epoch, and this run changes which samples those were ({diff}); resume with the same "
                          f"settings, or from a checkpoint at an epoch boundary")


def find_resume_point(run: RunConfigs, run_id: Optional[str] = None, world_size: int = 1) -> Optional[ResumePoint]:
    """--resume_from DIR | auto -> the checkpoint to resume from (None: start fresh). Collective.

    Rank 0 lists the candidates and reads their state; every rank helps verify the checksums; so all
    ranks take the same decision even on a file system whose caches differ between nodes. Damaged
    checkpoints are skipped with a warning under ``auto`` and refused when named explicitly.
    """
    value = run.train.resume_from.strip()
    if not value:
        return None
    world = world_size
    candidates = distributed.on_rank0(lambda: _resume_candidates(run, run_id), "find a checkpoint")
    for candidate in map(Path, candidates):
        info, why, manifest = distributed.on_rank0(lambda: (*try_read_state(candidate),
                                                            integrity.read_manifest(candidate)))
        problems = [why] if info is None else integrity.verify(candidate, manifest) if manifest else []
        if problems:
            if value != "auto":
                raise ConfigError(f"--resume_from: {candidate} is damaged: {problems[0]}")
            warn(f"skipping damaged checkpoint {candidate}: {problems[0]}"
                 + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
            continue
        if manifest is None:
            warn(f"{candidate} has no {integrity.MANIFEST} (written by an older version): not verified")
        _check_compatible(run, candidate, info, world)
        point = ResumePoint(candidate, StateDictType[info["checkpoint_type"]], info)
        log(f"--> resuming from {candidate} (step {point.step}, {point.checkpoint_type.name})")
        return point
    if candidates:
        warn(f"--resume_from auto: every checkpoint in {checkpoint_root(run)} is damaged; starting from scratch")
    return None


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every save/load without a process group; for one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _strip_prefix(state_dict: dict, prefix: str = "lm.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _all_finite(tensors, device: torch.device) -> bool:
    """Whether every tensor (local shards of DTensors) is finite, on all ranks. Collective."""
    bad = torch.zeros((), dtype=torch.float32, device=device)
    for v in tensors:
        local = v.to_local() if hasattr(v, "to_local") else v
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
            bad += 1
    return float(distributed.all_reduce_sum(bad)) == 0


class Checkpointer:
    """Saves and restores everything a run needs to continue, for FSDP and single-process runs alike.

    model: the training model (CausalLMWithLoss, sharded or not); lm: the transformers model or
    PeftModel inside it (used for save_pretrained); export_dtype: the dtype the final exported model
    is written in (the base checkpoint's); run_id: stored in every checkpoint and export; dist_info: this
    process's rank, the world size and the device (given, not read from the process group).
    """

    def __init__(self, run: RunConfigs, model: nn.Module, lm: nn.Module, optimizer, lr_scheduler, scaler=None,
                 tokenizer=None, export_dtype: Optional[torch.dtype] = None, run_id: Optional[str] = None,
                 dist_info: Optional[DistInfo] = None):
        self.run, self.model, self.lm = run, model, lm
        self.optimizer, self.lr_scheduler, self.scaler = optimizer, lr_scheduler, scaler
        self.tokenizer, self.export_dtype, self.run_id = tokenizer, export_dtype, run_id
        self.info = dist_info or DistInfo()
        self.root = checkpoint_root(run)
        self.is_peft = is_peft_model(lm)
        self.checkpoint_type = run.fsdp.checkpoint_type
        # Canonical names (as state dicts spell them) of the trained parameters. Every alias counts as
        # frozen unless it is trainable itself (peft's prompt learning keeps an alias of the frozen
        # embedding, which torch's ignore_frozen_params would otherwise store as trainable).
        self.trainable = {canonical_name(n) for n, p in model.named_parameters(remove_duplicate=False)
                          if p.requires_grad}
        self._saved: dict = {}  # step -> folder written by this run

    # ---- the train loop's hook -------------------------------------------------------------
    def __call__(self, state, reason: str) -> Path:
        """TrainContext.save_checkpoint: reason 'step' (every --save_every_n_steps), 'epoch' or 'best'. Returns the
        checkpoint folder."""
        t = self.run.train
        if reason == "step":
            path = self.save(state)
            self.prune()
            return path
        # End of an epoch (or of the run). The weights to export are checkpointed first, marked as such,
        # so that a run killed during the export finishes it when resumed. A checkpoint of this very step
        # taken mid-loop holds the same weights, optimizer and RNG (evaluation leaves the RNG as it was):
        # only its progress record moves on.
        export_due = reason == "best" or not t.run_validation
        path = self._saved.get(state.step)
        if path is not None:
            self._write_state(path, state, export_due)
        else:
            path = self.save(state, export_due)
        if reason == "best" and t.run_validation:
            self.mark_best(path, state.best_eval_loss)
        self.prune()
        if export_due:
            self.export(Path(t.output_dir) / "model", state.step)
        return path

    # ---- saving -----------------------------------------------------------------------------
    def save(self, state, export_due: bool = False) -> Path:
        """Write a resumable checkpoint for ``state`` (collective: every rank calls it)."""
        start = time.perf_counter()
        final = self.root / step_dir_name(state.step)
        tmp = self.root / f"{TMP_MARKER}{final.name}"

        def prepare():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)

        distributed.on_rank0(prepare, "prepare the checkpoint folder")
        if not _all_finite((p for p in self.model.parameters() if p.requires_grad), self.info.device):
            raise SaveError(f"the trained weights are not finite at step {state.step}; no checkpoint written "
                            f"(lower --lr, or use --gradient_clipping)")
        if self.checkpoint_type is StateDictType.SHARDED_STATE_DICT:
            self._save_sharded(tmp)
        else:
            self._save_full(tmp)
        torch.save(rng_state(self.info.device), tmp / "rng" / f"rank_{self.info.rank:05d}.pt")
        distributed.barrier()
        integrity.write_manifest(tmp)

        def finish():
            from shardtune.configs.parse import save_resolved

            save_resolved(self.run, tmp / "run_config.yaml")
            self._write_state(tmp, state, export_due, collective=False)  # last: marks it complete
            replace_directory(tmp, final)

        distributed.on_rank0(finish, "write the checkpoint")
        log(f"--> checkpoint ({self.checkpoint_type.name}) saved to {final} in {time.perf_counter() - start:.1f}s")
        self._saved[state.step] = final
        return final

    def _write_state(self, folder: Path, state, export_due: bool, collective: bool = True) -> None:
        """state.json: progress and everything small that resuming needs (atomically replaced)."""
        def write():
            t = self.run.train
            info = {"format": FORMAT_VERSION, "checkpoint_type": self.checkpoint_type.name,
                    "run_id": self.run_id, "train_state": state.to_dict(), "world_size": self.info.world_size,
                    "data_layout": data_layout(self.run, self.info.world_size),
                    "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "export_due": export_due, "model_name": t.model_name, "use_peft": bool(t.use_peft),
                    "peft_method": t.peft_method if t.use_peft else None,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_text(folder / STATE_FILE, json.dumps(info, indent=2) + "\n")

        if collective:
            distributed.on_rank0(write, "write the checkpoint state")
        else:
            write()

    def _model_state_for_saving(self, full: bool) -> dict:
        """The state dict to store: trainable weights for PEFT runs, every weight otherwise (frozen layers of
        --freeze_layers are left out of sharded checkpoints). full=True gathers it on rank 0. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.is_peft and not self.info.distributed:
            # One process: the trained parameters themselves. (get_model_state_dict asks every module for its
            # state dict, and bitsandbytes' int8 layers cannot produce theirs while they train.)
            return {canonical_name(n): p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        options = StateDictOptions(full_state_dict=full, cpu_offload=full and self.info.distributed,
                                   ignore_frozen_params=self.is_peft or not full)
        sd = get_model_state_dict(self.model, options=options)
        if self.is_peft:
            sd = {k: v for k, v in sd.items() if k in self.trainable}
        return sd

    def _save_sharded(self, tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        msd = self._model_state_for_saving(full=False)
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions())
        with quiet_single_process():
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), no_dist=not distributed.group_up())
        distributed.barrier()
        expected = set(msd)

        def check():
            stored = {k[len("model."):] for k in dcp.FileSystemReader(str(tmp)).read_metadata().state_dict_metadata
                      if k.startswith("model.")}
            missing = (expected | (self.trainable if self.is_peft else set())) - stored
            if missing or not stored:
                raise SaveError(f"checkpoint {tmp} holds {len(stored)} weight tensors but {len(expected)} were "
                                f"trained (missing: {', '.join(sorted(missing)[:3])}); not saved")

        distributed.on_rank0(check, "check the checkpoint")

    def _save_full(self, tmp: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        msd = _strip_prefix(self._model_state_for_saving(full=True))
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=self.info.distributed))

        def write():
            export_pretrained(self.lm, self.tokenizer, tmp / "model", state_dict=msd)  # training dtype: exact
            torch.save(osd, tmp / "optimizer.pt")

        distributed.on_rank0(write, "write the checkpoint")

    def export(self, out_dir: Path, step: int) -> None:
        """The deliverable: a Hugging Face folder in the base model's dtype, or a PEFT adapter folder,
        checked after writing (export.py). Collective."""
        sd = _strip_prefix(self._model_state_for_saving(full=True))

        def write():
            out = export_pretrained(self.lm, self.tokenizer, out_dir, state_dict=sd,
                                    dtype=None if self.is_peft else self.export_dtype,
                                    info={"run_id": self.run_id, "step": step})
            log(f"--> saved {'adapter' if self.is_peft else 'model'} (step {step}) to {out}")

        distributed.on_rank0(write, "save the model")

    def finish_interrupted_export(self, point: ResumePoint) -> None:
        """Resuming from a checkpoint whose weights were to be exported: export them unless <output_dir>/model
        already holds exactly them (the run was killed during the export). Collective; call after load()."""
        out = Path(self.run.train.output_dir) / "model"
        wanted = {"run_id": point.info.get("run_id"), "step": point.step}
        have = distributed.on_rank0(lambda: read_export_info(out), "read the exported model")
        if point.info.get("export_due") and (have is None or {k: have.get(k) for k in wanted} != wanted):
            log(f"--> the export of step {point.step} did not finish before the run stopped: exporting it now")
            self.export(out, point.step)

    def mark_best(self, path: Path, eval_loss: float) -> None:
        distributed.on_rank0(lambda: atomic_write_text(self.root / BEST_FILE, json.dumps(
            {"checkpoint": path.name, "eval_loss": eval_loss}) + "\n"), "record the best checkpoint")

    def best_name(self) -> Optional[str]:
        try:
            return json.loads((self.root / BEST_FILE).read_text(encoding="utf-8"))["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def prune(self) -> None:
        """Keep exactly the newest --keep_last_n_checkpoints of this run, plus the best one. Rank 0."""
        from shardtune.utils.io import remove_tree

        keep_n = self.run.train.keep_last_n_checkpoints

        def prune():
            found = list_checkpoints(self.root, self.run_id)
            best = self.best_name()
            for path in found[:-keep_n] if keep_n else []:
                if path.name != best:
                    remove_tree(path)

        distributed.on_rank0(prune, "prune checkpoints")

    # ---- loading ----------------------------------------------------------------------------
    def load(self, point: ResumePoint) -> "tuple":
        """Restore model, optimizer, scheduler, scaler and RNG from ``point``.

        Returns (TrainState, restore_rng): restore_rng is None when the RNG was restored already,
        or a function the training loop calls once it has created the epoch's data iterator (creating
        it draws a seed from the global RNG, as it did in the uninterrupted run before this checkpoint).
        """
        from shardtune.training.state import TrainState

        start = time.perf_counter()
        path = point.path
        if point.checkpoint_type is StateDictType.SHARDED_STATE_DICT:
            self._load_sharded(path)
        else:
            self._load_full_optimizer(path)  # the weights came in through --model_name / the adapter

        trainer = point.info
        if "lr_scheduler" not in trainer and (path / "trainer_state.pt").is_file():  # written by older versions
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
        self._saved[state.step] = path
        log(f"--> restored step {state.step} (epoch {state.epoch + 1}, {state.batches_in_epoch} batches into it) "
            f"in {time.perf_counter() - start:.1f}s")
        return state, restore_rng

    def _load_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_state_dict

        msd = self._model_state_for_saving(full=False)
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions())
        expected = set(msd)
        target = {"model": msd, "optim": osd}
        with quiet_single_process():
            dcp.load(target, checkpoint_id=str(path), no_dist=not distributed.group_up())
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
