"""Data sets by name (alpaca, grammar, samsum, custom, chat) -> tokenised samples with labels, cached on
disk once per tokenizer and settings. Entry points: get_preprocessed_dataset, get_custom_data_collator.

Labels are -100 where no loss is taken. Built-in data sets are a pair of functions (see :class:`Builder`)
so that tokenisation is done once and cached (datasets/cache.py); custom data sets are the user's own
function (datasets/custom_dataset.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from shardtune.datasets import alpaca_dataset, chat_dataset, custom_dataset, grammar_dataset, samsum_dataset
from shardtune.datasets.cache import cached_tokenized
from shardtune.datasets.checks import Source, drop_unsupervised
from shardtune.datasets.common import tokenize_prompt_and_target
from shardtune.utils import distributed


@dataclass(frozen=True)
class Builder:
    load_examples: Callable  # (dataset_config, split) -> list of text examples, in a fixed order
    tokenize: Callable       # (example, tokenizer, dataset_config) -> {"input_ids": [...], "labels": [...]}


DATASET_PREPROC = {
    "alpaca_dataset": Builder(alpaca_dataset.load_examples, tokenize_prompt_and_target),
    "grammar_dataset": Builder(grammar_dataset.load_examples, tokenize_prompt_and_target),
    "samsum_dataset": Builder(samsum_dataset.load_examples, tokenize_prompt_and_target),
    "chat_dataset": Builder(chat_dataset.load_examples, chat_dataset.tokenize_chat),
}
CACHE_SUBDIR = "data_cache"


def get_preprocessed_dataset(tokenizer, dataset_config, split: str = "train", train_config=None, rank: int = 0):
    """The tokenised split ('train' -> dataset_config.train_split, anything else -> test_split), checked.

    With a train_config, tokenisation is cached under ``<output_dir>/data_cache`` (rank 0 builds it,
    the other ranks wait and read it) and samples left with no supervised token after truncation to
    ``context_length`` are dropped with one warning (datasets/checks.py). A custom data set's samples are
    checked in full: token ids, field lengths, supervision. ``rank`` only names this process in warnings.
    """
    name = dataset_config.dataset
    which = dataset_config.train_split if split == "train" else dataset_config.test_split
    context_length = train_config.context_length if train_config is not None else None
    if name == "custom_dataset":
        samples = _custom(dataset_config, tokenizer, which)
        if not custom_dataset.has_collator(dataset_config):  # a collator takes samples of any shape
            samples = custom_dataset.check_samples(samples, dataset_config, which, len(tokenizer), context_length)
        return samples
    if name not in DATASET_PREPROC:
        raise NotImplementedError(f"{name} is not implemented")
    builder = DATASET_PREPROC[name]
    cache_dir = Path(train_config.output_dir) / CACHE_SUBDIR if train_config is not None else None
    samples = cached_tokenized(name, which, dataset_config, tokenizer, builder.load_examples, builder.tokenize,
                               cache_dir, rank)
    if train_config is None:
        return samples
    # shardtune's own tokenisation: ids come from the tokenizer; only the supervision needs checking
    return drop_unsupervised(samples, np.asarray(samples["length"]), np.asarray(samples["target_start"]),
                             context_length, Source(f"{name} {which}"))


def get_custom_data_collator(tokenizer, dataset_config):
    """The collator of a custom data set file (its collator hook), or None for the built-in collators."""
    if dataset_config.dataset != "custom_dataset":
        return None
    return custom_dataset.get_data_collator(dataset_config, tokenizer)


def _custom(dataset_config, tokenizer, split: str):
    """Rank 0 calls the user's function first (so that any caching it does happens once), then the others."""
    mine = {}

    def first() -> None:
        mine["data"] = custom_dataset.get_custom_dataset(dataset_config, tokenizer, split)

    distributed.on_rank0(first, "prepare the data")
    return mine["data"] if "data" in mine else custom_dataset.get_custom_dataset(dataset_config, tokenizer, split)
