"""Resumable checkpoints: write one, read one back, export the run's model, prune (layout.py says where).

Writing a checkpoint (every rank calls :meth:`Checkpointer.save`): every rank writes into
``.tmp-step_000120``: its weight and optimizer shards (weights.py) and its RNG file; rank 0 adds
state.json and run_config.yaml; after a barrier every file is fsynced and rank 0 writes the manifest
(integrity.py), the last file; then rank 0 renames the folder into place. What is written is checked when
it is written (every trained tensor is in the files; the weights are finite). Periodic SHARDED_STATE_DICT checkpoints
(reason "step", --fsdp_config.async_checkpoint) are written in the background (async_save.py): the save returns once
the state is copied into host memory, and the same sealing happens at the first step after every rank's write has
ended (reason "poll"), or before anything else is saved, at a stop, and at the end of the run (reason "finish"),
which wait for it. Every other checkpoint is synchronous. A checkpoint whose
state.json must change later (the end of an epoch at a step already checkpointed) is re-sealed the same
way: a hard-linked copy gets the new state.json and a new manifest and is swapped in atomically.

Resuming (resume.py chooses the checkpoint and verifies it) restores model, optimizer, LR scheduler,
gradient scaler, TrainState (step, epoch, the data position: samples consumed in the epoch by all ranks,
best eval loss, tokens) and the RNG streams. The data order needs no state: samplers are deterministic given
(seed, epoch), and continue the epoch from the data position on any number of ranks (data/sampler.py). DCP
reshards a sharded checkpoint on load onto however many ranks load it; a full one is broadcast from rank 0
and sharded again. On the world size it was saved with, a resume continues bit-identically.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from shardtune.configs.fsdp import StateDictType
from shardtune.configs.run import RunConfigs
from shardtune.errors import SaveError
from shardtune.model_checkpointing import integrity, layout
from shardtune.model_checkpointing.async_save import BackgroundWrite, BackgroundWriter, ended_everywhere
from shardtune.model_checkpointing.export import export_pretrained, read_export_info
from shardtune.model_checkpointing.resume import ResumePoint
from shardtune.model_checkpointing.weights import ModelState, TrainedObjects
from shardtune.utils import distributed
from shardtune.utils.distributed import DistInfo
from shardtune.utils.io import TMP_MARKER, atomic_write_text, replace_directory
from shardtune.utils.logging import log, warn
from shardtune.utils.rng import rng_state, set_rng_state


@dataclass(frozen=True)
class ExportSettings:
    """How the run's deliverable (<output_dir>/model) is written."""

    tokenizer: object = None                 # saved next to the weights (None: none)
    dtype: Optional[torch.dtype] = None      # full models: the base checkpoint's dtype (None: the training dtype)


@dataclass
class PendingSave:
    """A periodic checkpoint whose shards are being written in the background."""

    step: int
    final: Path              # where it goes once sealed
    write: BackgroundWrite   # into write.folder, the temporary folder
    blocked_s: float         # how long training stood still for it (staging, RNG and state files)


def _size_on_disk(folder: Path) -> str:
    """What a checkpoint costs on disk, in words (GB: 10^9 bytes)."""
    size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # a re-sealed checkpoint shares its unchanged files' data with the old one
    except OSError:
        shutil.copy2(src, dst)


class Checkpointer:
    """Saves and restores everything a run needs to continue. ``run_id`` is stored in every checkpoint and export;
    ``dist_info``: this process's rank, the world size and the device (given, not read from the process group)."""

    def __init__(self, run: RunConfigs, parts: TrainedObjects, export: ExportSettings, run_id: Optional[str],
                 dist_info: DistInfo):
        self.run, self.parts, self.export_settings, self.run_id, self.info = run, parts, export, run_id, dist_info
        self.state = ModelState(parts, dist_info)
        self.root = layout.checkpoint_root(run)
        self.checkpoint_type = run.fsdp.checkpoint_type
        self._saved: dict = {}  # step -> folder written (or resumed) by this run
        # Periodic checkpoints in the background (async_save.py): sharded ones only (a full one is gathered and
        # written by rank 0 alone), and at most one in flight (_pending).
        background = run.fsdp.async_checkpoint and self.checkpoint_type is StateDictType.SHARDED_STATE_DICT
        self.background = BackgroundWriter(dist_info.device, distributed.timeout_s(run.train.dist_timeout_s)) \
            if background else None
        self._pending: Optional[PendingSave] = None

    # ---- the train loop's hook -------------------------------------------------------------
    def __call__(self, state, reason: str) -> Optional[Path]:
        """TrainContext.save_checkpoint. Reasons: 'step' (every --save_every_n_steps; returns None when it is being
        written in the background), 'preempt' (a stop: this step's checkpoint, on disk), 'epoch' or 'best' (the
        epoch's end), 'poll' (once per step: seal a background checkpoint whose write has ended everywhere) and
        'finish' (the end of the run: wait for it). Returns the checkpoint folder written."""
        t = self.run.train
        if reason in ("poll", "finish"):
            self.settle(wait=reason == "finish")
            if reason == "finish" and self.background is not None:
                self.background.close()
            return None
        self.settle(wait=True)  # one save at a time: the staging buffers are reused, the order of steps kept
        if reason in ("step", "preempt"):
            if reason == "preempt" and state.step in self._saved:
                return self._saved[state.step]  # this step's periodic checkpoint, sealed just now
            path = self.save(state, background=reason == "step" and self.background is not None)
            if path is not None:
                self.prune()
            return path
        # End of an epoch (or of the run). The weights to export are checkpointed first, marked as such,
        # so that a run killed during the export finishes it when resumed. A checkpoint of this very step
        # taken mid-loop holds the same weights, optimizer and RNG (evaluation leaves the RNG as it was):
        # only its progress record moves on.
        export_due = reason == "best" or not t.run_validation
        path = self._saved.get(state.step)
        if path is not None:
            self._reseal(path, state, export_due)
        else:
            path = self.save(state, export_due)
        if reason == "best" and t.run_validation:
            distributed.on_rank0(lambda: layout.mark_best(self.root, path, state.best_eval_loss),
                                 "record the best checkpoint")
        self.prune()
        if export_due:
            self.export(Path(t.output_dir) / "model", state.step)
        return path

    # ---- saving -----------------------------------------------------------------------------
    def _fresh_tmp(self, final: Path) -> Path:
        tmp = self.root / f"{TMP_MARKER}{final.name}"

        def prepare():
            # Leftovers of a save that never finished (a kill during a background write): nothing is pending now.
            for stale in self.root.glob(f"{TMP_MARKER}{layout.STEP_PREFIX}*") if self.root.is_dir() else ():
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / layout.RNG_DIR).mkdir(parents=True)

        distributed.on_rank0(prepare, "prepare the checkpoint folder")
        return tmp

    def _seal(self, tmp: Path, final: Path, known_digests: Optional[dict] = None) -> None:
        """Manifest last (every file fsynced first), then the folder into place. Collective."""
        integrity.write_manifest(tmp, known_digests)

        distributed.on_rank0(lambda: replace_directory(tmp, final), "put the checkpoint in place")  # and fsyncs

    def save(self, state, export_due: bool = False, background: bool = False) -> Optional[Path]:
        """Write a resumable checkpoint for ``state`` (collective: every rank calls it). ``background``: return once
        the state is staged in host memory (None); :meth:`settle` seals it later."""
        start = time.perf_counter()
        final = self.root / layout.step_dir_name(state.step)
        tmp = self._fresh_tmp(final)
        if not self.state.all_finite():
            raise SaveError(f"the trained weights are not finite at step {state.step}; no checkpoint written "
                            f"(lower --lr, or use --gradient_clipping)")
        write = None
        if self.checkpoint_type is StateDictType.SHARDED_STATE_DICT:
            write = self.state.save_sharded(tmp, self.background if background else None)
        else:
            self.state.save_full(tmp, self.export_settings.tokenizer)
        torch.save(rng_state(self.info.device), layout.rng_file(tmp, self.info.rank))

        def write_run_files():
            from shardtune.configs.parse import save_resolved

            save_resolved(self.run, tmp / layout.RUN_CONFIG_FILE)
            self._write_state(tmp, state, export_due)

        distributed.on_rank0(write_run_files, "write the checkpoint state")
        if write is not None:
            self._pending = PendingSave(state.step, final, write, blocked_s=time.perf_counter() - start)
            return None
        self._seal(tmp, final)
        log(f"--> checkpoint step {state.step} ({self.checkpoint_type.name}) saved to {final} "
            f"({_size_on_disk(final)} on disk) in {time.perf_counter() - start:.1f}s")
        self._saved[state.step] = final
        return final

    def settle(self, wait: bool) -> None:
        """Seal the checkpoint being written in the background once every rank's write has ended (``wait``: wait
        for it; else only if it has). Collective while one is pending (every rank started it at the same step). A
        failed write raises here, on every rank, with its temporary folder removed and ``checkpoint_step`` set (the
        step it was of: utils/disk.guard_saves names it)."""
        pending = self._pending
        if pending is None:
            return
        tmp = pending.write.folder
        if wait and not pending.write.future.done():
            log(f"--> waiting for the checkpoint of step {pending.step} to be written (in the background)")
        try:
            if not ended_everywhere(pending.write, wait):
                return
            self._pending = None
            written_s = time.perf_counter() - pending.write.started
            self.state.check_sharded(tmp)
            self._seal(tmp, pending.final, pending.write.digests)
        except BaseException as exc:
            self._pending = None
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            exc.checkpoint_step = pending.step
            raise
        self._saved[pending.step] = pending.final
        log(f"--> checkpoint step {pending.step} ({self.checkpoint_type.name}) saved to {pending.final} "
            f"({_size_on_disk(pending.final)} on disk; training blocked {pending.blocked_s:.1f} s, written in the "
            f"background in {written_s:.1f} s)")
        self.prune()

    def _reseal(self, path: Path, state, export_due: bool) -> None:
        """A new state.json for the checkpoint at ``path``: in a hard-linked copy, sealed anew and swapped in, so that
        the folder in place always matches its manifest. Collective."""
        tmp = self.root / f"{TMP_MARKER}{path.name}"

        def copy_with_new_state():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp, copy_function=_link_or_copy)
            for old in (integrity.MANIFEST, integrity.LEGACY_MANIFEST):
                (tmp / old).unlink(missing_ok=True)
            self._write_state(tmp, state, export_due)  # replaces the link, never the shared file

        distributed.on_rank0(copy_with_new_state, "update the checkpoint state")
        self._seal(tmp, path)

    def _write_state(self, folder: Path, state, export_due: bool) -> None:
        """state.json: progress and everything small that resuming needs (rank 0)."""
        t, parts = self.run.train, self.parts
        info = {"format": layout.FORMAT_VERSION, "checkpoint_type": self.checkpoint_type.name,
                "run_id": self.run_id, "train_state": state.to_dict(), "world_size": self.info.world_size,
                "data_layout": layout.data_layout(self.run, self.info.world_size),
                "lr_scheduler": parts.lr_scheduler.state_dict() if parts.lr_scheduler is not None else None,
                "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
                "export_due": export_due, "model_name": t.model_name, "use_peft": bool(t.use_peft),
                "peft_method": t.peft_method if t.use_peft else None,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(folder / layout.STATE_FILE, json.dumps(info, indent=2) + "\n")

    def prune(self) -> None:
        """Keep exactly the newest --keep_last_n_checkpoints of this run, plus the best one. Rank 0."""
        distributed.on_rank0(lambda: layout.prune(self.root, self.run_id, self.run.train.keep_last_n_checkpoints),
                             "prune checkpoints")

    # ---- the deliverable ----------------------------------------------------------------------
    def export(self, out_dir: Path, step: int) -> None:
        """A Hugging Face folder in the base model's dtype, or a PEFT adapter folder, written shard by shard and
        checked as it is written (export.py). Collective."""
        is_peft = self.state.is_peft
        export_pretrained(self.parts.lm, self.export_settings.tokenizer, out_dir,
                          state_dict=self.state.export_tensors(), dtype=None if is_peft else self.export_settings.dtype,
                          info={"run_id": self.run_id, "step": step})

    def finish_interrupted_export(self, point: ResumePoint) -> None:
        """Resuming from a checkpoint whose weights were to be exported: export them unless <output_dir>/model
        already holds exactly them (the run was killed during the export). Collective; call after load()."""
        out = Path(self.run.train.output_dir) / "model"
        wanted = {"run_id": point.info.get("run_id"), "step": point.step}
        have = distributed.on_rank0(lambda: read_export_info(out), "read the exported model")
        if point.info.get("export_due") and (have is None or {k: have.get(k) for k in wanted} != wanted):
            log(f"--> the export of step {point.step} did not finish before the run stopped: exporting it now")
            self.export(out, point.step)

    # ---- loading ----------------------------------------------------------------------------
    def load(self, point: ResumePoint) -> Tuple[object, Optional[Callable[[], None]]]:
        """Restore model, optimizer, scheduler, scaler and RNG from ``point`` (verified by resume.py).

        Returns (TrainState, restore_rng): restore_rng is None when the RNG was restored already,
        or a function the training loop calls once it has created the epoch's data iterator (creating
        it draws a seed from the global RNG, as it did in the uninterrupted run before this checkpoint).
        """
        from shardtune.training.state import POSITION_FROM_BATCHES, TrainState

        start = time.perf_counter()
        path, parts = point.path, self.parts
        if point.checkpoint_type is StateDictType.SHARDED_STATE_DICT:
            self.state.load_sharded(path)
        else:
            self.state.load_full_optimizer(path)  # the weights came in through --model_name / the adapter

        trainer = point.info
        if "lr_scheduler" not in trainer and (path / "trainer_state.pt").is_file():  # written by older versions
            trainer = torch.load(path / "trainer_state.pt", weights_only=True)
        if parts.lr_scheduler is not None and trainer.get("lr_scheduler") is not None:
            parts.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
        if parts.scaler is not None and trainer.get("scaler") is not None:
            parts.scaler.load_state_dict(trainer["scaler"])

        known = {f.name for f in fields(TrainState)}
        saved_state = point.info["train_state"]
        state = TrainState(**{k: v for k, v in saved_state.items() if k in known})
        if "samples_in_epoch" not in saved_state and state.batches_in_epoch:
            state.samples_in_epoch = POSITION_FROM_BATCHES  # format 1-2: the loop derives it (same layout)
        rng_path = layout.rng_file(path, self.info.rank)
        restore_rng: Optional[Callable[[], None]] = None
        if rng_path.is_file():
            saved = torch.load(rng_path, weights_only=True)
            restore_rng = lambda: set_rng_state(saved, self.info.device)  # noqa: E731
        elif point.info.get("world_size") in (None, self.info.world_size):  # else resume.py's line said so
            warn(f"{path} has no RNG state for rank {self.info.rank} (saved with {point.info.get('world_size')} "
                 f"ranks); random streams (dropout) will differ from the uninterrupted run")
        if restore_rng is not None and state.batches_in_epoch == 0 and state.samples_in_epoch == 0:
            restore_rng()  # at an epoch boundary: the next epoch's iterator has not drawn its seed yet
            restore_rng = None
        self._saved[state.step] = path
        position = "" if state.samples_in_epoch == POSITION_FROM_BATCHES else f"{state.samples_in_epoch} samples, "
        log(f"--> restored step {state.step} (epoch {state.epoch + 1}, {position}{state.batches_in_epoch} batches "
            f"per rank into it on {point.info.get('world_size')} rank(s)) "
            f"in {time.perf_counter() - start:.1f}s")
        return state, restore_rng
