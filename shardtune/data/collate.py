"""Collators: lists of samples -> batch tensors. Only the keys the model takes are used, so samples
may carry extra columns (the cache's ``length`` and ``target_start``)."""
from __future__ import annotations

from typing import Dict, List

import torch

from shardtune.models.loss import IGNORE_INDEX


class PaddingCollator:
    """Right-pads to the longest sample in the batch after truncation to max_length. Padding has
    labels -100 and attention_mask 0."""

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, samples: List[dict]) -> Dict[str, torch.Tensor]:
        ids = [list(s["input_ids"][: self.max_length]) for s in samples]
        labels = [list(s["labels"][: self.max_length]) for s in samples]
        width = max(len(x) for x in ids)
        return {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids], dtype=torch.long),
            "labels": torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=torch.long),
        }


def packed_collator(samples: List[dict]) -> Dict[str, torch.Tensor]:
    """Packed blocks all have the same length: stack them. No attention_mask: position_ids carry the
    document boundaries (see data/packing.py)."""
    return {k: torch.tensor([s[k] for s in samples], dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}
