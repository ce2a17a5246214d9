"""Stanford Alpaca instruction data (JSON list of {instruction, input, output}).

Prompt templates are the reference's. Prompt and response are tokenised separately and joined, so
the label mask always falls exactly on the response (the reference tokenised prompt and
prompt+response separately, and the two could disagree at the boundary).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from shardtune.datasets.common import data_error, tokenize_prompt_and_target

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
VAL_FRACTION = 0.05
SPLIT_SEED = 42


def format_prompt(record: dict) -> str:
    if record.get("input"):
        return PROMPT_WITH_INPUT.format_map(record)
    return PROMPT_NO_INPUT.format_map(record)


def load_records(path: str) -> list:
    p = Path(path)
    if not p.is_file():
        raise data_error("--alpaca_dataset.data_path", path,
                         "alpaca_data.json from https://github.com/tatsu-lab/stanford_alpaca")
    records = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, dict) and "instruction" in r and "output" in r
                                                for r in records[:10]):
        raise data_error("--alpaca_dataset.data_path", path, "a JSON list of {instruction, input, output} records",
                         problem="is not")
    return records


def split_records(records: list, split: str) -> list:
    """A fixed, seeded 5% validation split; 'train' is the rest (in the original order)."""
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = max(1, int(len(records) * VAL_FRACTION))
    val_ids = set(order[:n_val])
    if split == "train":
        return [r for i, r in enumerate(records) if i not in val_ids]
    return [r for i, r in enumerate(records) if i in val_ids]


def get_alpaca_dataset(dataset_config, tokenizer, split: str):
    records = split_records(load_records(dataset_config.data_path), split)
    return [tokenize_prompt_and_target(tokenizer, format_prompt(r), r["output"]) for r in records]
