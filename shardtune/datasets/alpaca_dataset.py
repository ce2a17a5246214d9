"""Stanford Alpaca instruction data (JSON list of {instruction, input, output}).

Prompt templates are the reference's; the target is ``output``. The validation split is a fixed,
seeded 5% of the records (the reference took the first 5%, unshuffled).
"""
from __future__ import annotations

from typing import List

from shardtune.datasets.common import drop_empty, read_located_records, require_file, split_records
from shardtune.errors import ConfigError

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
FLAG = "--alpaca_dataset.data_path"
SOURCE = "your copy of alpaca_data.json from https://github.com/tatsu-lab/stanford_alpaca"
FORMAT = "a JSON list of {instruction, input, output} records"


def format_prompt(record: dict) -> str:
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def load_records(path: str) -> List[dict]:
    located = read_located_records(require_file(path, FLAG, SOURCE), FLAG, FORMAT)
    for where, record in located:
        missing = [f for f in ("instruction", "output") if f not in record]
        if missing:
            raise ConfigError(f"{FLAG}: {path}, {where} has no {' or '.join(repr(f) for f in missing)} field, so "
                              f"the file is not {FORMAT}")
    return [record for _, record in located]


def load_examples(dataset_config, split: str) -> List[dict]:
    records = split_records(load_records(dataset_config.data_path), split, "--alpaca_dataset.train_split/test_split")
    records = drop_empty(records, ("instruction", "output"), f"alpaca_dataset {split}")
    return [{"prompt": format_prompt(r), "target": r["output"]} for r in records]
