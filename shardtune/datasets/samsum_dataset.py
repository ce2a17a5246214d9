"""SAMSum dialogue summarisation: {id, dialogue, summary} records.

``data_path`` is either a local folder holding the corpus files (train.json / val.json / test.json,
as distributed in the original archive) or a Hugging Face hub id (``knkarthick/samsum``), which
needs the network. Split names: train, validation (val.json), test.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from shardtune.datasets.common import drop_empty, read_json_records, require_file
from shardtune.errors import ConfigError, first_line

PROMPT = "Summarize this dialog:\n{dialog}\n---\nSummary:\n"
FLAG = "--samsum_dataset.data_path"
SPLIT_FILES = {"train": "train.json", "validation": "val.json", "val": "val.json", "test": "test.json"}
SOURCE = ("a folder with train.json / val.json / test.json of the SAMSum corpus (the original corpus archive, "
          "CC BY-NC-ND 4.0), or a hub id such as knkarthick/samsum when online")


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _from_folder(folder: Path, split: str) -> List[dict]:
    if split not in SPLIT_FILES:
        raise ConfigError(f"--samsum_dataset.train_split/test_split: unknown split {split!r}; valid: "
                          f"{', '.join(SPLIT_FILES)}")
    path = require_file(str(folder / SPLIT_FILES[split]), FLAG, SOURCE)
    return read_json_records(path, FLAG, "a JSON list of {id, dialogue, summary} records")


def _from_hub(hub_id: str, split: str) -> List[dict]:
    if _offline():
        raise ConfigError(f"{FLAG}: {hub_id!r} is not a local folder, and the hub is offline (HF_HUB_OFFLINE); "
                          f"set {FLAG} to {SOURCE}")
    import datasets

    try:
        return list(datasets.load_dataset(hub_id, split=split))
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-split errors become one line
        raise ConfigError(f"{FLAG}: cannot load {hub_id!r} split {split!r} from the hub: {first_line(exc)}") from None


def load_examples(dataset_config, split: str) -> List[dict]:
    folder = Path(dataset_config.data_path).expanduser()
    if folder.is_file():  # e.g. the path of train.json itself: not a hub id either
        raise ConfigError(f"{FLAG}: {dataset_config.data_path} is a file; give the folder that holds it "
                          f"(set {FLAG} to {SOURCE})")
    records = _from_folder(folder, split) if folder.is_dir() else _from_hub(dataset_config.data_path, split)
    records = drop_empty(records, ("dialogue", "summary"), f"samsum_dataset {split}")
    # The corpus has Windows line ends inside dialogues; the model should see the '\n' users type.
    return [{"prompt": PROMPT.format(dialog=r["dialogue"].replace("\r\n", "\n")), "target": r["summary"]}
            for r in records]
