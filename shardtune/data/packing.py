"""Packing: whole documents placed into fixed-length blocks, without attention across documents.

How documents are kept apart: every block carries ``position_ids`` that restart at 0 at each
document start, and no ``attention_mask``. Transformers (``masking_utils.find_packed_sequence_indices``)
turns restarting position ids into a block-diagonal causal mask for SDPA, eager and FlexAttention,
and flash-attention uses them as varlen boundaries. Verified in tests/test_packing.py on SDPA and
eager, and in tests/gpu on FlexAttention (the CUDA default): a document's loss inside a block equals
its loss alone. Two conditions, both met by
utils/loss.CausalLMWithLoss: no ``attention_mask`` is passed, and no KV cache (``use_cache=False``);
with either, transformers silently falls back to one causal mask over the whole block. (PEFT
prefix tuning passes a cache, so data/loader.py uses padded batches for it.)

Placement is best-fit decreasing: documents, longest first, go into the open block with the least
room that still fits them. A document is never split (a split document's tail would lose its
context); documents longer than the block are truncated to it. The unused end of every block, the
last one included, is padding with labels -100. Blocks are planned from lengths alone and built on
access, so nothing is materialised up front.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Sequence

from torch.utils.data import Dataset

from shardtune.data.sampler import sample_lengths
from shardtune.models.loss import IGNORE_INDEX


def plan_blocks(lengths: Sequence[int], block_size: int) -> List[List[int]]:
    """Document indices of each block (best-fit decreasing; lengths are capped at block_size)."""
    free: List[int] = []               # sorted distinct amounts of free room among open blocks
    open_blocks: Dict[int, List[int]] = {}  # free room -> blocks with exactly that room
    blocks: List[List[int]] = []
    for doc in sorted(range(len(lengths)), key=lambda i: (-min(lengths[i], block_size), i)):
        size = min(lengths[doc], block_size)
        pos = bisect.bisect_left(free, size)
        if pos < len(free):  # the tightest open block that fits
            room = free[pos]
            block = open_blocks[room].pop()
            if not open_blocks[room]:
                del open_blocks[room]
                free.pop(pos)
        else:
            room, block = block_size, len(blocks)
            blocks.append([])
        blocks[block].append(doc)
        room -= size
        if room > 0:
            if room not in open_blocks:
                bisect.insort(free, room)
                open_blocks[room] = []
            open_blocks[room].append(block)
    return blocks


class PackedDataset(Dataset):
    """Blocks of ``block_size`` tokens: input_ids, labels and per-document position_ids."""

    def __init__(self, samples: Sequence[dict], block_size: int, pad_token_id: int):
        self.samples, self.block_size, self.pad_token_id = samples, block_size, pad_token_id
        self.lengths = [min(n, block_size) for n in sample_lengths(samples)]
        self.blocks = plan_blocks(self.lengths, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def fill_ratio(self) -> float:
        return sum(self.lengths) / max(1, len(self.blocks) * self.block_size)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        ids: List[int] = []
        labels: List[int] = []
        pos: List[int] = []
        for doc in self.blocks[index]:
            sample = self.samples[doc]
            n = self.lengths[doc]
            if n == 0:
                continue
            doc_labels = list(sample["labels"][:n])
            # Position 0 of a document is predicted from the previous document's last token: never a target.
            doc_labels[0] = IGNORE_INDEX
            ids += list(sample["input_ids"][:n])
            labels += doc_labels
            pos += range(n)
        n_pad = self.block_size - len(ids)
        return {"input_ids": ids + [self.pad_token_id] * n_pad, "labels": labels + [IGNORE_INDEX] * n_pad,
                "position_ids": pos + list(range(n_pad))}


def pack_dataset(samples: Sequence[dict], block_size: int, pad_token_id: int) -> PackedDataset:
    return PackedDataset(samples, block_size, pad_token_id)
