"""Packing: documents concatenated into fixed-length blocks, without attention across documents.

Each block carries ``position_ids`` that restart at 0 at every document start. Transformers turns
position ids that restart into a block-diagonal causal mask (SDPA / FlexAttention) or varlen
boundaries (flash-attn), so a token never attends to another document. A document longer than a
block continues in the next block (its positions continue too). The last partial block is kept and
padded (labels -100) instead of being thrown away.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from shardtune.utils.loss import IGNORE_INDEX


def pack_dataset(samples: Sequence[dict], block_size: int, pad_token_id: int) -> List[Dict[str, List[int]]]:
    blocks: List[Dict[str, List[int]]] = []
    ids: List[int] = []
    labels: List[int] = []
    pos: List[int] = []
    for sample in samples:
        doc_ids = list(sample["input_ids"])
        doc_labels = list(sample["labels"])
        # The first token of a document is never a target: position t predicts t + 1, and the token
        # before a document start belongs to the previous document.
        doc_labels[0] = IGNORE_INDEX
        doc_pos = list(range(len(doc_ids)))
        ids += doc_ids
        labels += doc_labels
        pos += doc_pos
        while len(ids) >= block_size:
            blocks.append(_block(ids[:block_size], labels[:block_size], pos[:block_size]))
            ids, labels, pos = ids[block_size:], labels[block_size:], pos[block_size:]
            if pos and pos[0] != 0 and labels:
                # a document split across blocks: its continuation starts a fresh causal context in the
                # new block, so its first token there cannot be predicted from inside the block
                labels[0] = IGNORE_INDEX
                pos = _restart_first_doc(pos)
    if ids:
        n_pad = block_size - len(ids)
        blocks.append(_block(ids + [pad_token_id] * n_pad, labels + [IGNORE_INDEX] * n_pad,
                             pos + list(range(n_pad))))
    return blocks


def _restart_first_doc(pos: List[int]) -> List[int]:
    """Make the carried-over tail of a split document start at position 0 in its new block."""
    out = list(pos)
    start = out[0]
    i = 0
    while i < len(out) and (i == 0 or out[i] != 0):
        out[i] -= start
        i += 1
    return out


def _block(ids: List[int], labels: List[int], pos: List[int]) -> Dict[str, List[int]]:
    return {"input_ids": ids, "labels": labels, "position_ids": pos}
