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
from shardtune.datasets.common import target_start, tokenize_prompt_and_target
from shardtune.errors import ConfigError
from shardtune.utils import distributed
from shardtune.utils.logging import log, warn


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
    """The tokenised split ('train' -> dataset_config.train_split, anything else -> test_split).

    With a train_config, tokenisation is cached under ``<output_dir>/data_cache`` (rank 0 builds it,
    the other ranks wait and read it) and samples left with no supervised token after truncation to
    ``context_length`` are dropped with one warning. ``rank`` only names this process in warnings.
    """
    name = dataset_config.dataset
    which = dataset_config.train_split if split == "train" else dataset_config.test_split
    if name == "custom_dataset":
        samples = _custom(dataset_config, tokenizer, which)
    elif name in DATASET_PREPROC:
        builder = DATASET_PREPROC[name]
        cache_dir = Path(train_config.output_dir) / CACHE_SUBDIR if train_config is not None else None
        samples = cached_tokenized(name, which, dataset_config, tokenizer, builder.load_examples, builder.tokenize,
                                   cache_dir, rank)
    else:
        raise NotImplementedError(f"{name} is not implemented")
    if train_config is not None:
        samples = drop_unsupervised(samples, train_config.context_length, f"{name} {which}")
    return samples


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


def drop_unsupervised(samples, context_length: int, what: str):
    """Drop samples whose first supervised label lies beyond ``context_length`` (they would train on
    nothing after truncation), with one warning giving the count."""
    if getattr(samples, "column_names", None) and "target_start" in samples.column_names:
        lengths = np.asarray(samples["length"])
        starts = np.asarray(samples["target_start"])
    else:
        first = samples[0] if len(samples) else None
        if not (isinstance(first, dict) and "labels" in first):
            return samples  # a custom collator builds the labels: nothing to check here
        labels = [samples[i]["labels"] for i in range(len(samples))]
        lengths = np.asarray([len(x) for x in labels])
        starts = np.asarray([target_start(x) for x in labels])
    keep = starts < np.minimum(lengths, context_length)
    truncated = int((lengths[keep] > context_length).sum())
    if truncated:
        log(f"--> {what}: {truncated} of {int(keep.sum())} samples are longer than context_length={context_length} "
            "and are truncated")
    if keep.all():
        return samples
    if not keep.any():
        raise ConfigError(f"--context_length {context_length}: too small for any sample of {what} (the shortest "
                          f"prompt takes {int(starts.min())} tokens); raise --context_length")
    warn(f"{what}: dropped {int((~keep).sum())} of {len(keep)} samples that have no supervised token within "
         f"context_length={context_length} (the prompt fills it); raise --context_length to keep them")
    kept = np.flatnonzero(keep).tolist()
    if hasattr(samples, "select"):  # datasets.Dataset
        return samples.select(kept)
    if isinstance(samples, list):
        return [samples[i] for i in kept]
    from torch.utils.data import Subset

    return Subset(samples, kept)
