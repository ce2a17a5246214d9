"""Content checks of tokenised samples, run once over the whole data set before the first step.

What a malformed sample does when nothing checks it: a token id outside the vocabulary fails inside the
embedding in the middle of the first epoch (on CUDA as a device-side assert that names nothing), text in
place of ids fails in a DataLoader worker, labels shorter than input_ids are silently cut by the collator,
and a sample with no supervised label trains on nothing. Here each is one line naming the data set's file,
the sample and the field, before the model's weights are read.

Samples built by shardtune's own tokenisation (datasets/cache.py) come from the tokenizer, so only their
supervision is checked, from the cached ``length`` / ``target_start`` columns. Samples returned by a
custom data set function are checked in full. A custom collator builds its own batches from samples of
any shape, so nothing is checked then.

Samples without a supervised token are dropped with one warning that counts them (a few such records in
a large set are normal: an empty answer, a prompt longer than the context); when no sample is left, the
run is refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from shardtune.errors import ConfigError
from shardtune.models.loss import IGNORE_INDEX
from shardtune.utils.logging import log, warn

ID_FIELDS = ("input_ids", "labels", "attention_mask")
SHOW_AT_MOST = 5  # sample indices listed in the drop warning


@dataclass(frozen=True)
class Source:
    """How messages name the data: ``what`` (e.g. "--custom_dataset.file my_data.py: get_custom_dataset(...,
    split='train')") and ``item`` (how one sample is named from its index, e.g. 'sample [3]')."""

    what: str
    item: Optional[Callable[[int], str]] = None  # None: indices mean nothing to the user (shardtune's own samples)


def _token_array(value, field: str, where: str) -> np.ndarray:
    """``value`` as a 1-D int64 array, or one line saying why it is not a list of token ids."""
    if isinstance(value, (str, bytes)):
        raise ConfigError(f"{where}: {field} is text ({value[:30]!r}), not token ids; tokenise it in your data set "
                          "function (tokenizer.encode)")
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as exc:  # ragged nesting, integers beyond int64
        raise ConfigError(f"{where}: {field} is not a flat list of token ids ({exc})") from None
    if array.ndim != 1:
        raise ConfigError(f"{where}: {field} must be a flat list of token ids, got an array of shape "
                          f"{tuple(array.shape)}")
    if array.size and (array.dtype == bool or not np.issubdtype(array.dtype, np.integer)):
        items = list(value)  # the caller's own elements: a list of ints with one 6.5 in it names the 6.5
        bad = next((k for k, x in enumerate(items) if isinstance(x, bool) or not isinstance(x, (int, np.integer))), 0)
        raise ConfigError(f"{where}: {field}[{bad}] = {items[bad]!r} is not an integer token id")
    return array.astype(np.int64, copy=False)


def _check_range(array: np.ndarray, field: str, where: str, vocab_size: int, allow_ignore: bool) -> None:
    bad = (array < 0) | (array >= vocab_size)
    if allow_ignore:
        bad &= array != IGNORE_INDEX
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        why = "negative" if array[k] < 0 else "outside the vocabulary"
        also = f" or {IGNORE_INDEX} (no loss)" if allow_ignore else ""
        raise ConfigError(f"{where}: {field}[{k}] = {int(array[k])} is {why}: token ids must be in 0..{vocab_size - 1} "
                          f"(the tokenizer's {vocab_size} tokens){also}")


def check_sample(sample, where: str, vocab_size: int) -> np.ndarray:
    """Types, ranges and lengths of one sample's fields; returns its labels."""
    if not isinstance(sample, Mapping) or "input_ids" not in sample or "labels" not in sample:
        got = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
        raise ConfigError(f"{where}: expected a dict with 'input_ids' and 'labels', got {got}")
    arrays = {f: _token_array(sample[f], f, where) for f in ID_FIELDS if sample.get(f) is not None}
    _check_range(arrays["input_ids"], "input_ids", where, vocab_size, allow_ignore=False)
    _check_range(arrays["labels"], "labels", where, vocab_size, allow_ignore=True)
    n = len(arrays["input_ids"])
    for field in ID_FIELDS[1:]:
        if field in arrays and len(arrays[field]) != n:
            raise ConfigError(f"{where}: {field} has {len(arrays[field])} entries but input_ids has {n}; they must be "
                              f"the same length ({field}[t] belongs to input_ids[t])")
    return arrays["labels"]


def check_custom_samples(samples, source: Source, vocab_size: int, context_length: Optional[int],
                         read: Callable[[int], object]):
    """Check every sample a custom data set function returned (``read(i)`` fetches sample i, reporting an
    exception in the user's code as one line), then drop those without a supervised token."""
    lengths, starts = [], []
    name = source.item or (lambda i: f"sample [{i}]")
    for i in range(len(samples)):
        labels = check_sample(read(i), f"{source.what}: {name(i)}", vocab_size)
        supervised = np.flatnonzero(labels[1:] != IGNORE_INDEX)  # as common.target_start: position 0 never counts
        lengths.append(len(labels))
        starts.append(int(supervised[0]) + 1 if supervised.size else len(labels))
    return drop_unsupervised(samples, np.asarray(lengths, dtype=np.int64), np.asarray(starts, dtype=np.int64),
                             context_length, source)


def drop_unsupervised(samples, lengths: np.ndarray, starts: np.ndarray, context_length: Optional[int],
                      source: Source):
    """Drop the samples whose first supervised label (``starts``, see common.target_start) is missing or lies
    beyond ``context_length`` (they would train on nothing after truncation), with one warning that counts
    them; refuse when none is left. ``context_length`` None: no truncation."""
    limit = np.minimum(lengths, context_length) if context_length else lengths
    unlabelled = starts >= lengths           # every label is -100 (or the sample is one token long)
    cut = ~unlabelled & (starts >= limit)    # the target lies beyond context_length
    if context_length:
        truncated = int((~unlabelled & ~cut & (lengths > context_length)).sum())
        if truncated:
            log(f"--> {source.what}: {truncated} of {len(lengths)} samples are longer than "
                f"context_length={context_length} and are truncated")
    dropped = unlabelled | cut
    if not dropped.any():
        return samples
    n = len(lengths)
    if dropped.all():
        if cut.any():  # the context is the cause for some: the flag to change is --context_length
            also = f" ({int(unlabelled.sum())} have no supervised label at all)" if unlabelled.any() else ""
            raise ConfigError(f"--context_length {context_length}: too small for any sample of {source.what}: no "
                              f"supervised token within it (the shortest prompt takes {int(starts[cut].min())} "
                              f"tokens){also}; raise --context_length")
        raise ConfigError(f"{source.what}: no supervised token in any of its {n} samples (every label is "
                          f"{IGNORE_INDEX}); set labels to the token ids to learn, {IGNORE_INDEX} only where no loss "
                          "is taken")
    reasons = []
    if unlabelled.any():
        reasons.append(f"{int(unlabelled.sum())} with every label {IGNORE_INDEX}{_examples(unlabelled, source)}")
    if cut.any():
        reasons.append(f"{int(cut.sum())} whose target lies beyond context_length={context_length} (the prompt "
                       f"fills it; raise --context_length to keep them){_examples(cut, source)}")
    warn(f"{source.what}: dropped {int(dropped.sum())} of {n} samples that have no supervised token: "
         + "; ".join(reasons))
    return _select(samples, np.flatnonzero(~dropped).tolist())


def _examples(mask: np.ndarray, source: Source) -> str:
    if source.item is None:
        return ""
    picked = np.flatnonzero(mask)[:SHOW_AT_MOST].tolist()
    more = ", ..." if mask.sum() > SHOW_AT_MOST else ""
    return f" ({', '.join(source.item(i) for i in picked)}{more})"


def _select(samples, kept: List[int]):
    if hasattr(samples, "select"):  # datasets.Dataset
        return samples.select(kept)
    if isinstance(samples, list):
        return [samples[i] for i in kept]
    from torch.utils.data import Subset

    return Subset(samples, kept)
