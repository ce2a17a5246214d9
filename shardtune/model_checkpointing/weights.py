"""The model's and optimizer's state, into a checkpoint's files and back, for FSDP and single-process runs alike.

SHARDED_STATE_DICT: torch.distributed.checkpoint (DCP) writes every rank's shards of the trainable weights
and of the optimizer state in parallel; nothing is gathered. FULL_STATE_DICT: the weights are written as a
Hugging Face (or PEFT adapter) folder in the training dtype, gathered and written one shard at a time
(export.py); so is the optimizer state, as safetensors shards plus ``optimizer.json`` (optimizer_state.py). Frozen
parameters (a
PEFT run's base model, --freeze_layers) are not stored in sharded checkpoints; they come from --model_name again
on resume, exactly as at the start of the run.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from shardtune.errors import SaveError
from shardtune.model_checkpointing import optimizer_state
from shardtune.model_checkpointing.async_save import BackgroundWrite, BackgroundWriter
from shardtune.model_checkpointing.export import canonical_name, export_pretrained, is_peft_model
from shardtune.model_checkpointing.streaming import MAX_SHARD_SIZE
from shardtune.utils import distributed
from shardtune.utils.distributed import DistInfo

MODEL_DIR = "model"  # FULL_STATE_DICT: the checkpoint's Hugging Face / adapter folder


@dataclass(frozen=True)
class TrainedObjects:
    """What a checkpoint saves and restores, besides progress and RNG."""

    model: nn.Module                  # the training model (CausalLMWithLoss, sharded or not)
    lm: nn.Module                     # the transformers model or PeftModel inside it (save_pretrained)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Optional[Any] = None
    scaler: Optional[Any] = None      # the fp16 gradient scaler


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every save/load without a process group; for one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def strip_prefix(state_dict: dict, prefix: str = "lm.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def stored_weight_names(folder: Path) -> set:
    """The model tensors a DCP checkpoint's metadata lists (without the ``model.`` prefix)."""
    import torch.distributed.checkpoint as dcp

    return {k[len("model."):] for k in dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
            if k.startswith("model.")}


class ModelState:
    """Reads and writes the weights and optimizer state of ``parts`` (collective methods: every rank calls them)."""

    def __init__(self, parts: TrainedObjects, dist_info: DistInfo):
        self.parts, self.info = parts, dist_info
        self.is_peft = is_peft_model(parts.lm)
        # Canonical names (as state dicts spell them) of the trained parameters. Every alias counts as
        # frozen unless it is trainable itself (peft's prompt learning keeps an alias of the frozen
        # embedding, which torch's ignore_frozen_params would otherwise store as trainable).
        self.trainable = {canonical_name(n) for n, p in parts.model.named_parameters(remove_duplicate=False)
                          if p.requires_grad}

    def all_finite(self) -> bool:
        """Whether every trained tensor (local shards of DTensors) is finite, on all ranks."""
        bad = torch.zeros((), dtype=torch.float32, device=self.info.device)
        for p in self.parts.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if p.requires_grad and local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
                bad += 1
        return float(distributed.all_reduce_sum(bad)) == 0

    def model_state(self, full: bool) -> dict:
        """The state dict to store: trainable weights for PEFT runs, every weight otherwise (frozen layers of
        --freeze_layers are left out of sharded checkpoints). full=True gathers it on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model = self.parts.model
        if self.is_peft and not self.info.distributed:
            # One process: the trained parameters themselves. (get_model_state_dict asks every module for its
            # state dict, and bitsandbytes' int8 layers cannot produce theirs while they train.)
            return {canonical_name(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}
        options = StateDictOptions(full_state_dict=full, cpu_offload=full and self.info.distributed,
                                   ignore_frozen_params=self.is_peft or not full)
        sd = get_model_state_dict(model, options=options)
        if self.is_peft:
            sd = {k: v for k, v in sd.items() if k in self.trainable}
        return sd

    def export_tensors(self) -> dict:
        """The weights an export writes, keyed as the transformers model / PeftModel names them: the trainable
        parameters for PEFT runs, every weight otherwise. Live tensors, not copies (FSDP2: DTensor shards, which
        export.py gathers one at a time, collectively): saving never holds the whole model in host memory."""
        model = self.parts.model
        if self.is_peft:
            named = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        else:
            named = {canonical_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
        return strip_prefix(named)

    def _optimizer_state(self) -> dict:
        """The optimizer's state dict as DCP stores it: each rank's shards (never gathered)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.parts.model, self.parts.optimizer)

    # ---- SHARDED_STATE_DICT ---------------------------------------------------------------
    def save_sharded(self, folder: Path, background: Optional[BackgroundWriter] = None) -> Optional[BackgroundWrite]:
        """Write the shards into ``folder`` and check them; with ``background``, return once the state is copied into
        host memory, the write going on in a thread (async_save.py): the caller calls :meth:`check_sharded` once it
        has ended everywhere."""
        import torch.distributed.checkpoint as dcp

        state_dict = {"model": self.model_state(full=False), "optim": self._optimizer_state()}
        if background is not None:
            return background.start(state_dict, folder)
        with quiet_single_process():
            dcp.save(state_dict, checkpoint_id=str(folder), no_dist=not distributed.group_up())
        self.check_sharded(folder)
        return None

    def check_sharded(self, folder: Path) -> None:
        """Every trained weight is in the written shards (rank 0 reads the metadata). Collective."""
        distributed.barrier()
        expected = set(self.model_state(full=False)) | (self.trainable if self.is_peft else set())

        def check():
            stored = stored_weight_names(folder)
            missing = expected - stored
            if missing or not stored:
                raise SaveError(f"checkpoint {folder} holds {len(stored)} weight tensors but {len(expected)} were "
                                f"trained (missing: {', '.join(sorted(missing)[:3])}); not saved")

        distributed.on_rank0(check, "check the checkpoint")

    def load_sharded(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        msd = self.model_state(full=False)
        expected = set(msd)
        target = {"model": msd, "optim": self._optimizer_state()}
        with quiet_single_process():
            dcp.load(target, checkpoint_id=str(folder), no_dist=not distributed.group_up())
        result = set_state_dict(self.parts.model, self.parts.optimizer, model_state_dict=target["model"],
                                optim_state_dict=target["optim"],
                                options=StateDictOptions(ignore_frozen_params=True, strict=False))
        missing = set(getattr(result, "missing_keys", []) or []) & expected
        if missing:
            raise RuntimeError(f"checkpoint {folder} lacks trainable weights: {sorted(missing)[:3]}...")

    # ---- FULL_STATE_DICT ------------------------------------------------------------------
    def save_full(self, folder: Path, tokenizer, max_shard_size=MAX_SHARD_SIZE) -> None:
        """The weights, then the optimizer state, each streamed shard by shard into ``folder`` (the checkpoint's
        temporary folder, so that its manifest covers them) and read back as written. Collective."""
        export_pretrained(self.parts.lm, tokenizer, folder / MODEL_DIR, state_dict=self.export_tensors(),
                          max_shard_size=max_shard_size)  # the training dtype: exact
        optimizer_state.save(self.parts.model, self.parts.optimizer, folder if self.info.is_main else None,
                             max_shard_size=max_shard_size)

    def load_full_optimizer(self, folder: Path) -> None:
        """The optimizer state (the weights came in through --model_name / the adapter folder). Collective."""
        if optimizer_state.is_legacy(folder):
            self._load_legacy_optimizer(folder)
        else:
            optimizer_state.load(self.parts.model, self.parts.optimizer, folder, self.info.device)

    def _load_legacy_optimizer(self, folder: Path) -> None:
        """``optimizer.pt``, the whole state gathered by rank 0 (checkpoints written before optimizer_state.py):
        rank 0 loads it whole and broadcasts it, as it was written."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = folder / optimizer_state.LEGACY_FILE
        osd = torch.load(path, weights_only=True) if self.info.is_main else {}
        sharded = self.info.world_size > 1
        set_optimizer_state_dict(self.parts.model, self.parts.optimizer, osd,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded))
