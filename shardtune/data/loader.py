"""DataLoaders for training and evaluation (padding or packing, one or many ranks).

Training loaders reshuffle every epoch (the loop calls ``loader.batch_sampler.set_epoch(epoch)``);
evaluation loaders keep a fixed order. Both see every sample exactly once per pass, and under N ranks
every rank gets the same number of batches: a rank left one short gets a filler batch whose labels
are all -100 (0 loss, 0 tokens), so FSDP's collectives stay matched (see data/sampler.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from shardtune.data.collate import PaddingCollator, packed_collator
from shardtune.data.packing import pack_dataset
from shardtune.data.sampler import LengthBasedBatchSampler, RandomBatchSampler
from shardtune.models.loss import IGNORE_INDEX
from shardtune.utils.logging import log, warn
from shardtune.utils.signals import ignore_stop_signals


class WithFillers(Dataset):
    """Index i < n is sample i; index n + j is sample j as a filler. Items are (is_filler, sample)."""

    def __init__(self, data):
        self.data, self.n = data, len(data)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        filler = index >= self.n
        return filler, self.data[index - self.n if filler else index]


class FillerCollator:
    """Collates (is_filler, sample) items; a filler batch gets labels -100 everywhere."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items):
        batch = self.collate([sample for _, sample in items])
        if items[0][0]:
            if "labels" not in batch:
                raise RuntimeError("the collator must return 'labels' so that filler batches (ranks with fewer "
                                   "batches under FSDP) can be masked out")
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        return batch


def _packing_unavailable(train_cfg, collate_fn) -> Optional[str]:
    """Why packing cannot be used for this run, or None."""
    if collate_fn is not None:
        return "with a custom collator (it batches the data set's own samples)"
    if train_cfg.use_peft and train_cfg.peft_method == "prefix":
        # Prefix tuning feeds its virtual tokens to the model as a KV cache, and with a cache transformers
        # builds one causal mask over the whole block: documents would attend to each other.
        return "with --peft_method prefix (its KV cache turns off the per-document attention mask)"
    return None


def build_dataloader(samples, tokenizer, train_cfg, *, train: bool, rank: int = 0, world_size: int = 1,
                     collate_fn: Optional[Callable] = None) -> DataLoader:
    """``samples``: tokenised samples (dicts with input_ids and labels), e.g. from get_preprocessed_dataset.
    ``collate_fn``: a custom data set's collator, which replaces the built-in one (and packing)."""
    batch_size = train_cfg.batch_size_training if train else train_cfg.val_batch_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    which = "train" if train else "eval"
    order = dict(shuffle=train, seed=train_cfg.seed, num_replicas=world_size, rank=rank)
    packing = train_cfg.batching_strategy == "packing"
    reason = _packing_unavailable(train_cfg, collate_fn) if packing else None
    if reason:
        warn(f"--batching_strategy packing does not apply {reason}: using length-grouped padded batches")
        packing = False
    if packing:
        dataset = pack_dataset(samples, train_cfg.context_length, pad_id)
        sampler = RandomBatchSampler(len(dataset), batch_size, **order)
        collate = packed_collator
        log(f"--> packing ({which}): {len(samples)} samples into {len(dataset)} blocks of {train_cfg.context_length} "
            f"tokens ({dataset.fill_ratio:.0%} filled); no attention across documents: position_ids restart at "
            "every document and transformers derives a block-diagonal causal mask from them (SDPA / eager / flex; "
            "varlen boundaries for flash-attn)")
    else:
        dataset = samples
        sampler = LengthBasedBatchSampler(samples, batch_size, **order)
        collate = collate_fn or PaddingCollator(pad_id, train_cfg.context_length)
    if world_size > 1:
        dataset, collate = WithFillers(dataset), FillerCollator(collate)
    workers = train_cfg.num_workers_dataloader
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=2 if workers > 0 else None,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None)


def check_batch_fits(loader: DataLoader, batch_size: int, world_size: int) -> None:
    """One optimizer step needs batch_size samples (or packed blocks) on every rank: a larger batch than the
    data set would only repeat fillers and waste memory."""
    from shardtune.errors import ConfigError

    units = loader.batch_sampler.num_samples
    what = "packed blocks" if isinstance(loader.batch_sampler, RandomBatchSampler) else "samples"
    if batch_size * world_size > units:
        raise ConfigError(f"--batch_size_training {batch_size}: the training set has only {units} {what}"
                          + (f" for {world_size} ranks" if world_size > 1 else "")
                          + f"; use --batch_size_training {max(1, units // world_size)} or less")


def is_packed(loader: DataLoader) -> bool:
    """Whether ``loader`` yields packed blocks (documents kept apart by restarting position_ids)."""
    from shardtune.data.packing import PackedDataset

    dataset = loader.dataset
    return isinstance(dataset.data if isinstance(dataset, WithFillers) else dataset, PackedDataset)
