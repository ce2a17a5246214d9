"""Packing: block planning, block contents, and no attention across documents (SDPA and eager)."""
from __future__ import annotations

import random

import pytest
import torch

from shardtune.data.collate import packed_collator
from shardtune.data.packing import pack_dataset, plan_blocks
from shardtune.models.loss import IGNORE_INDEX


def _doc(n: int, start: int, prompt: int = 2) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


@pytest.mark.parametrize("block", [8, 64, 512])
def test_plan_places_every_document_once_within_capacity(block):
    rng = random.Random(block)
    lengths = [rng.randint(1, 2 * block) for _ in range(300)]
    blocks = plan_blocks(lengths, block)
    placed = sorted(d for b in blocks for d in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(min(lengths[d], block) for d in b) <= block for b in blocks)
    # best fit decreasing wastes less than one block on top of the ideal count
    assert len(blocks) <= sum(min(n, block) for n in lengths) / block * 1.25 + 1
    assert plan_blocks(lengths, block) == blocks  # deterministic


def test_blocks_restart_positions_mask_doc_starts_and_pad_the_tail():
    docs = [_doc(5, 100), _doc(3, 200), _doc(12, 300)]  # the 12-token doc is truncated to the block
    packed = pack_dataset(docs, block_size=10, pad_token_id=0)
    blocks = [packed[i] for i in range(len(packed))]
    assert all(len(b["input_ids"]) == len(b["labels"]) == len(b["position_ids"]) == 10 for b in blocks)
    by_first = {b["input_ids"][0]: b for b in blocks}
    long_doc = by_first[300]
    assert long_doc["input_ids"] == list(range(300, 310)) and long_doc["position_ids"] == list(range(10))
    mixed = by_first[100]  # 5 + 3 tokens, then 2 padding tokens (the partial block is kept)
    assert mixed["input_ids"] == [100, 101, 102, 103, 104, 200, 201, 202, 0, 0]
    assert mixed["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert mixed["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, 103, 104, IGNORE_INDEX, IGNORE_INDEX, 202,
                               IGNORE_INDEX, IGNORE_INDEX]
    batch = packed_collator(blocks)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see data/packing.py
    assert batch["input_ids"].shape == (len(blocks), 10)


@pytest.fixture(scope="module")
def real_docs(tiny_llama_dir, data_root):
    """Five Alpaca records (synthetic, then real when ../shared/data exists), tokenised by the real pipeline."""
    import json

    from transformers import AutoTokenizer

    from shardtune.datasets.alpaca_dataset import format_prompt
    from shardtune.datasets.common import tokenize_prompt_and_target

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with open(data_root / "alpaca" / "alpaca_data.json", encoding="utf-8") as fh:
        records = json.load(fh)[:5]
    return [tokenize_prompt_and_target({"prompt": format_prompt(r), "target": r["output"]}, tok) for r in records]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_loss_in_a_packed_block_equals_its_loss_alone(attn, tiny_llama_dir, real_docs):
    """Through the training forward (CausalLMWithLoss), fp32: each document's mean loss matches within 1e-4."""
    from transformers import AutoModelForCausalLM

    from shardtune.models.loss import CausalLMWithLoss

    model = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attn,
                                                                  dtype=torch.float32)).eval()
    assert model.base_model.config._attn_implementation == attn
    block = sum(len(d["input_ids"]) for d in real_docs) + 7  # one block holding all five, plus padding
    (packed,) = [packed_collator([b]) for b in pack_dataset(real_docs, block, pad_token_id=0)]
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(real_docs) + 1  # five documents and the padding tail

    with torch.no_grad():
        for begin, end in zip(starts, starts[1:]):
            alone = {"input_ids": packed["input_ids"][:, begin:end], "labels": packed["labels"][:, begin:end]}
            only_this = torch.full_like(packed["labels"], IGNORE_INDEX)
            only_this[:, begin:end] = packed["labels"][:, begin:end]
            in_block = model(input_ids=packed["input_ids"], labels=only_this, position_ids=packed["position_ids"])
            by_itself = model(**alone)
            assert int(in_block.num_tokens) == int(by_itself.num_tokens) > 0
            mean_in_block = float(in_block.loss_sum) / int(in_block.num_tokens)
            assert mean_in_block == pytest.approx(float(by_itself.loss_sum) / int(by_itself.num_tokens), abs=1e-4)
        # Control: the same block with an attention mask (which turns the per-document mask off) differs,
        # so the comparison above can fail.
        second = slice(starts[1], starts[2])
        only_second = torch.full_like(packed["labels"], IGNORE_INDEX)
        only_second[:, second] = packed["labels"][:, second]
        leaky = model(input_ids=packed["input_ids"], labels=only_second, position_ids=packed["position_ids"],
                      attention_mask=torch.ones_like(packed["input_ids"]))
        alone = model(input_ids=packed["input_ids"][:, second], labels=packed["labels"][:, second])
        assert abs(float(leaky.loss_sum) - float(alone.loss_sum)) / int(alone.num_tokens) > 1e-3  # 10x the tolerance
