"""Grammar correction (llama-recipes' grammar_dataset): CSV files with ``input,target`` columns.

``train_split`` and ``test_split`` are the CSV paths themselves (as in the reference). The files
are made by llama-recipes' grammar_dataset_process.ipynb (JFLEG + the first 10,000 rows of C4_200M),
which writes them with a UTF-8 byte-order mark, hence ``utf-8-sig``.
"""
from __future__ import annotations

import csv
import io
from typing import List

from shardtune.datasets.common import drop_empty, require_file
from shardtune.errors import ConfigError
from shardtune.utils.io import read_text

PROMPT = "Correct this to standard English: {input}\n---\nCorrected: "
SOURCE = ("a CSV with input,target columns, e.g. {name} written by llama-recipes' grammar_dataset_process.ipynb "
          "(JFLEG + C4_200M)")


def load_examples(dataset_config, split: str) -> List[dict]:
    field = "train_split" if split == dataset_config.train_split else "test_split"
    flag = f"--grammar_dataset.{field}"
    name = "gtrain_10k.csv" if field == "train_split" else "grammar_validation.csv"
    path = require_file(split, flag, SOURCE.format(name=name))
    reader = csv.DictReader(io.StringIO(read_text(path, flag), newline=""))
    if not {"input", "target"} <= set(reader.fieldnames or ()):
        raise ConfigError(f"{flag}: {path} needs 'input' and 'target' columns, found {reader.fieldnames}")
    rows = list(reader)
    rows = drop_empty(rows, ("input", "target"), f"grammar_dataset {path.name}")
    return [{"prompt": PROMPT.format(input=r["input"]), "target": r["target"]} for r in rows]
