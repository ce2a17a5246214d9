"""Pieces shared by the data set builders: file errors, reading records, splits, tokenisation.

Every builder turns its source into *examples* first (plain text: ``{"prompt", "target"}`` or
``{"messages"}``) and only then tokenises them, so that tokenisation can be cached in one place
(datasets/cache.py) and tests can tokenise a handful of real records directly.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from shardtune.errors import ConfigError
from shardtune.models.loss import IGNORE_INDEX
from shardtune.utils.io import read_text
from shardtune.utils.logging import warn

VAL_FRACTION = 0.05
SPLIT_SEED = 42
TRAIN_SPLITS = ("train",)
VAL_SPLITS = ("val", "validation", "test")


def file_not_found(flag: str, path: str, how_to_get: str) -> ConfigError:
    """One line naming the flag that sets the path and where the data set comes from."""
    return ConfigError(f"{flag}: file not found: {path} (set {flag} to {how_to_get})")


def require_file(path: str, flag: str, how_to_get: str) -> Path:
    """The path of an existing file; a missing path or a folder is one line naming the flag."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag}: {path} is a directory, not a file (set {flag} to {how_to_get})")
    if not p.is_file():
        raise file_not_found(flag, path, how_to_get)
    return p


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_located_records(path: Path, flag: str, what: str) -> List[Tuple[str, dict]]:
    """(where, record) pairs of a JSON list of objects ('record [i]', 0-based) or of JSON Lines, one object
    per line ('line n', 1-based, counting blank lines as the file has them), so that every later error
    can point at the record."""
    text = read_text(path, flag)
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        located = []
        # split on "\n" only: str.splitlines() also splits at U+2028 and other separators, which JSON allows
        # raw inside strings, and would shift every later line number
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{flag}: {path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno}); "
                                  f"expected {what}") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{flag}: {path} is not valid JSON ({exc.msg}: line {exc.lineno} column "
                              f"{exc.colno}); expected {what}") from None
        if not isinstance(records, list):
            raise ConfigError(f"{flag}: {path} must hold {what}")
        located = [(f"record [{i}]", r) for i, r in enumerate(records)]
    for where, record in located:
        if not isinstance(record, dict):
            raise ConfigError(f"{flag}: {path}, {where} is a JSON {_JSON_TYPES.get(type(record), 'value')}, not an "
                              f"object; the file must hold {what}")
    if not located:
        raise ConfigError(f"{flag}: {path} holds no records; expected {what}")
    return located


def read_json_records(path: Path, flag: str, what: str) -> List[dict]:
    """A JSON list of objects, or JSON Lines (one object per line)."""
    return [record for _, record in read_located_records(path, flag, what)]


def split_records(records: Sequence, split: str, flag: str) -> list:
    """A fixed, seeded 5% validation split ('val'); 'train' is the rest. Both keep the file order.

    The split depends only on the number of records and a constant seed, never on global RNG state,
    so every rank and every run agrees on it.
    """
    if split not in TRAIN_SPLITS + VAL_SPLITS:
        raise ConfigError(f"{flag}: expected 'train' or 'val', got {split!r}")
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    val_ids = set(order[: max(1, int(len(records) * VAL_FRACTION))])
    want_val = split in VAL_SPLITS
    return [r for i, r in enumerate(records) if (i in val_ids) == want_val]


def drop_empty(examples: List[dict], fields: Sequence[str], what: str) -> List[dict]:
    """Skip records whose prompt or answer text is empty (e.g. SAMSum train id 13828807 has no dialogue;
    49 Alpaca records have no output): training on them teaches nothing but hallucination or an
    immediate EOS. One warning gives the count."""
    kept = [e for e in examples if all(str(e.get(f) or "").strip() for f in fields)]
    if len(kept) < len(examples):
        warn(f"{what}: skipped {len(examples) - len(kept)} of {len(examples)} records with an empty "
             f"{' or '.join(fields)}")
    return kept


def bos_ids(tokenizer) -> List[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def tokenize_prompt_and_target(example: dict, tokenizer, dataset_config=None) -> Dict[str, List[int]]:
    """[bos] + prompt + target + [eos], with labels only on target + eos.

    Prompt and target are tokenised separately and joined, so the label mask falls exactly on the
    target (the reference tokenised prompt and prompt+target separately; the two can disagree at the
    boundary).
    """
    prompt_ids = bos_ids(tokenizer) + tokenizer.encode(example["prompt"], add_special_tokens=False)
    target_ids = tokenizer.encode(example["target"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


def target_start(labels: Sequence[int]) -> int:
    """Position of the first supervised label, or len(labels) when there is none.

    Position 0 never counts: the loss at position t predicts labels[t] from tokens before t, and
    nothing precedes position 0.
    """
    for i in range(1, len(labels)):
        if labels[i] != IGNORE_INDEX:
            return i
    return len(labels)
