"""Tokenise once: an Arrow cache file keyed on everything that decides the tokens, written by rank 0.

Rank 0 reads the source, computes the key, and tokenises only when no cache file has that key
(``datasets.Dataset.map`` writes the file atomically). The other ranks wait for rank 0 (a broadcast
of the file's path, which doubles as the barrier) and memory-map the same file. The cache lives
under ``<output_dir>/data_cache`` because that folder is shared between nodes in multi-node runs
(checkpoints need that too); a node that cannot see the file tokenises for itself, with a warning.

The key covers: a code version, the data set name and split, its config, the text of every example
(so edited data files and templates invalidate it) and the tokenizer's full definition.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Callable, List, Optional

from shardtune.datasets.common import target_start
from shardtune.errors import ConfigError
from shardtune.utils import distributed
from shardtune.utils.logging import log

CACHE_VERSION = 1  # bump whenever tokenisation code changes the tokens it produces


def _features():
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32"), "target_start": Value("int32")})


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser, special tokens, template)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # e.g. a sentencepiece tokenizer: hash the pickled object as datasets does
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tokenizer).encode())
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
             getattr(tokenizer, "chat_template", None)]
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(name: str, split: str, dataset_config, tokenizer, examples: List[dict]) -> str:
    h = hashlib.sha256()
    config = dataclasses.asdict(dataset_config) if dataclasses.is_dataclass(dataset_config) else vars(dataset_config)
    h.update(json.dumps([CACHE_VERSION, name, split, config], sort_keys=True, default=str).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for example in examples:
        h.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def tokenize_examples(examples: List[dict], tokenize: Callable, tokenizer, dataset_config, *,
                      cache_file: Optional[Path] = None, fingerprint: str = "", desc: str = "Tokenizing"):
    """A datasets.Dataset with input_ids, labels, length and target_start (see common.target_start).

    The map runs over example indices, so examples may hold any Python objects (chat messages).
    """
    from datasets import Dataset

    def tokenize_batch(batch):
        rows = [tokenize(examples[i], tokenizer, dataset_config) for i in batch["i"]]
        return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows],
                "length": [len(r["input_ids"]) for r in rows],
                "target_start": [target_start(r["labels"]) for r in rows]}

    index = Dataset.from_dict({"i": list(range(len(examples)))})
    return index.map(tokenize_batch, batched=True, batch_size=1000, remove_columns=["i"], features=_features(),
                     cache_file_name=str(cache_file) if cache_file else None, keep_in_memory=cache_file is None,
                     new_fingerprint=fingerprint or None, desc=desc)


def cached_tokenized(name: str, split: str, dataset_config, tokenizer, load_examples: Callable,
                     tokenize: Callable, cache_dir: Optional[Path], rank: int = 0):
    """The tokenised split, from the cache when present. Without cache_dir every process tokenises in memory."""
    from datasets import Dataset

    if cache_dir is None:
        return tokenize_examples(load_examples(dataset_config, split), tokenize, tokenizer, dataset_config,
                                 desc=f"Tokenizing {name} {split}")

    def build() -> str:
        examples = load_examples(dataset_config, split)
        if not examples:  # e.g. a file too small to split off a validation set, or only empty records
            raise ConfigError(f"{name}: the {split!r} split holds no usable example; check the data file")
        key = cache_key(name, split, dataset_config, tokenizer, examples)
        slug = re.sub(r"[^\w.-]+", "_", Path(split).name)
        path = Path(cache_dir) / f"{name}-{slug}-{key[:16]}.arrow"
        if path.is_file():
            log(f"--> {name} {split}: reusing the tokenised cache {path}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tokenize_examples(examples, tokenize, tokenizer, dataset_config, cache_file=path, fingerprint=key,
                              desc=f"Tokenizing {name} {split}")
            log(f"--> {name} {split}: tokenised {len(examples)} examples into {path}")
        return str(path)

    path = distributed.on_rank0(build, "prepare the data")
    if not Path(path).is_file():  # another node, whose output_dir is not shared with rank 0's
        print(f"warning: [rank {rank}] {path} is not visible on this node "
              "(output_dir not shared?): tokenising here", file=sys.stderr, flush=True)
        path = build()
    dataset = Dataset.from_file(path)
    distributed.barrier()  # every rank holds the file before any may go on (and on an error remove it)
    return dataset
