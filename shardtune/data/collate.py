"""Collators: lists of samples -> padded tensors."""
from __future__ import annotations

from typing import Dict, List

import torch

from shardtune.utils.loss import IGNORE_INDEX


class PaddingCollator:
    """Right-pads to the longest sample in the batch (after truncation to max_length); labels pad with -100."""

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, samples: List[dict]) -> Dict[str, torch.Tensor]:
        samples = [{k: list(v)[: self.max_length] for k, v in s.items()} for s in samples]
        width = max(len(s["input_ids"]) for s in samples)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for s in samples:
            pad = width - len(s["input_ids"])
            out["input_ids"].append(s["input_ids"] + [self.pad_token_id] * pad)
            out["labels"].append(s["labels"] + [IGNORE_INDEX] * pad)
            out["attention_mask"].append(s.get("attention_mask", [1] * len(s["input_ids"])) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def packed_collator(samples: List[dict]) -> Dict[str, torch.Tensor]:
    """Packed blocks all have the same length: stack them. No attention_mask: position_ids carry the
    document boundaries."""
    return {k: torch.tensor([s[k] for s in samples], dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}
