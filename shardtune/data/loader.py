"""DataLoaders for training and evaluation (padding or packing, one or many ranks)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from shardtune.data.collate import PaddingCollator, packed_collator
from shardtune.data.packing import pack_dataset
from shardtune.data.sampler import LengthBasedBatchSampler, RandomBatchSampler


def build_dataloader(samples, tokenizer, train_cfg, *, train: bool, rank: int = 0, world_size: int = 1,
                     collate_fn=None) -> DataLoader:
    """Training loaders reshuffle every epoch (call ``loader.batch_sampler.set_epoch(epoch)``); evaluation
    loaders keep every sample exactly once."""
    batch_size = train_cfg.batch_size_training if train else train_cfg.val_batch_size
    if train_cfg.batching_strategy == "packing":
        samples = pack_dataset(samples, train_cfg.context_length, tokenizer.pad_token_id)
        sampler = RandomBatchSampler(len(samples), batch_size, shuffle=train, seed=train_cfg.seed,
                                     num_replicas=world_size, rank=rank, drop_last=train)
        collate = collate_fn or packed_collator
    else:
        sampler = LengthBasedBatchSampler(samples, batch_size, drop_last=train, shuffle=train, seed=train_cfg.seed,
                                          num_replicas=world_size, rank=rank)
        collate = collate_fn or PaddingCollator(tokenizer.pad_token_id, train_cfg.context_length)
    return DataLoader(samples, batch_sampler=sampler, collate_fn=collate,
                      num_workers=train_cfg.num_workers_dataloader, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)
