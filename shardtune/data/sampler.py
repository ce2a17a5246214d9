"""Batch samplers for one process or N ranks.

* Every epoch reshuffles from a private RNG seeded with (seed, epoch): no global RNG is read or
  reseeded (the reference reseeded Python's global ``random``), and all ranks compute the same order
  without communicating. Call ``set_epoch(epoch)`` before each epoch.
* Rank r takes batches r, r + W, r + 2W, ... of that common list, so ranks' batches are disjoint
  and together cover the data set; after every rank took k batches, the first k * W batches of the
  list are consumed: always a prefix of the epoch's sample order (the list's batches one after another).
* The data position is that prefix's length, in samples (or packed blocks), all ranks together: the
  same number whatever the world size. :meth:`start_at` continues an epoch after its first ``position``
  items, on any number of ranks and with any batch size: the epoch's order is formed again (with the
  batch size the epoch started with, which groups the length-based batches) and what is left is cut into
  this run's batches. With the layout of the run that stopped (the same ranks and batch size), those are
  exactly the batches that run had left: a resume on the same world size continues bit-identically.
* Every rank yields the same number of batches, because FSDP needs every rank to run the same
  number of forward passes. Ranks left one short get a *filler* batch: the indices of a real batch
  shifted by ``num_samples``. The loader (data/loader.py) turns a filler into a batch whose labels
  are all -100, so it adds 0 to the loss and 0 to the token count. Nothing is dropped, in training
  or evaluation.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, List, Optional, Sequence

from torch.utils.data import Sampler


def sample_lengths(data: Sequence) -> List[int]:
    """Token count of every sample (the ``length`` column of a cached data set when there is one)."""
    if getattr(data, "column_names", None) and "length" in data.column_names:
        return [int(n) for n in data["length"]]
    out = []
    for i in range(len(data)):
        sample = data[i]
        if isinstance(sample, dict):
            out.append(len(sample["input_ids"] if "input_ids" in sample else next(iter(sample.values()))))
        else:
            out.append(len(sample))
    return out


class _EpochBatchSampler(Sampler[List[int]]):
    """The rank / epoch / filler logic; subclasses only say how one epoch's batches are formed."""

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool,
                 num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (:meth:`start_at` continues one after a resume)."""
        self.epoch = epoch
        self.start_at(0)

    def start_at(self, position: int, order_batch_size: Optional[int] = None) -> None:
        """Continue this epoch after its first ``position`` items (all ranks together); its order is formed with
        ``order_batch_size`` (the batch size the epoch started with; None: this sampler's)."""
        if not 0 <= position <= self.epoch_size():
            raise ValueError(f"position {position} not in [0, {self.epoch_size()}]")
        self.position, self.order_batch_size = position, order_batch_size or self.batch_size
        self._left: Optional[List[List[int]]] = None  # the batches left, formed on first use

    def _rng(self) -> random.Random:
        return random.Random(self.seed * 1_000_003 + self.epoch)

    def _indices(self, rng: random.Random, batch_size: int) -> List[int]:
        """This epoch's sample order (shuffled when training), cut to whole batches with drop_last."""
        order = list(range(self.num_samples))
        if self.shuffle:
            rng.shuffle(order)
        if self.drop_last:
            order = order[: len(order) - len(order) % batch_size]
        return order

    @staticmethod
    def _chunk(order: List[int], batch_size: int) -> List[List[int]]:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def epoch_batches(self, batch_size: int) -> List[List[int]]:
        """All ranks' batches of a whole epoch of ``batch_size``, in order (identical on every rank)."""
        raise NotImplementedError

    def batches(self) -> List[List[int]]:
        """All ranks' batches still to come in this epoch, from the position on (identical on every rank)."""
        if self._left is None:
            whole = self.epoch_batches(self.order_batch_size)
            if self.order_batch_size != self.batch_size:  # the rest of the epoch's order, in this run's batches
                whole = self._chunk([i for batch in whole for i in batch], self.batch_size)
            left, seen = [], 0
            for batch in whole:  # the batch under way (after a change of batch size) cut to its unconsumed part
                if seen + len(batch) > self.position:
                    left.append(batch[max(0, self.position - seen):])
                seen += len(batch)
            # A filler repeats the epoch's first batch wherever the epoch is resumed, so that it is the same one
            # as in the run that was not stopped.
            self._left, self._filler = left, [i + self.num_samples for i in whole[0]] if whole else []
        return self._left

    def epoch_size(self) -> int:
        """Items (samples or packed blocks) one epoch trains on, all ranks together."""
        return self.num_samples - (self.num_samples % self.batch_size if self.drop_last else 0)

    def num_batches(self) -> int:
        """Batches of all ranks together in one whole epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __len__(self) -> int:
        """Batches per rank from the position on (a whole epoch after set_epoch)."""
        left = self.num_batches() if self.position == 0 and self.order_batch_size == self.batch_size \
            else len(self.batches())
        return math.ceil(left / self.num_replicas)

    def position_after(self, taken: int) -> int:
        """The data position once every rank has taken ``taken`` batches of this iteration (fillers count 0)."""
        return self.position + sum(len(b) for b in self.batches()[:taken * self.num_replicas])

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.batches()
        mine = batches[self.rank::self.num_replicas]
        yield from mine
        for _ in range(len(self) - len(mine)):  # at most one: see the module docstring
            yield self._filler


class LengthBasedBatchSampler(_EpochBatchSampler):
    """Batches of similar length, so little padding is needed.

    Samples are sorted by length, ties broken by a fresh random order every epoch (so batch contents
    change between epochs, not only their order), chunked, and the batch order is shuffled. Without
    shuffle (evaluation) batches go from short to long.
    """

    def __init__(self, data_source: Sequence, batch_size: int, drop_last: bool = False, shuffle: bool = True,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.lengths = sample_lengths(data_source)
        super().__init__(len(self.lengths), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                         num_replicas=num_replicas, rank=rank)

    def epoch_batches(self, batch_size: int) -> List[List[int]]:
        rng = self._rng()
        order = sorted(self._indices(rng, batch_size), key=self.lengths.__getitem__)  # stable: ties keep the order
        batches = self._chunk(order, batch_size)
        if self.shuffle:
            rng.shuffle(batches)
        return batches


class RandomBatchSampler(_EpochBatchSampler):
    """Consecutive chunks of one random permutation (used for packed blocks, which all have one length).

    The permutation depends on (seed, epoch) only, not on the batch size, so step k of batch size 8
    holds the same samples as micro-batches 4k..4k+3 of batch size 2: gradient accumulation and more
    ranks are equivalent to a bigger batch.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = False):
        super().__init__(num_samples, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                         num_replicas=num_replicas, rank=rank)

    def epoch_batches(self, batch_size: int) -> List[List[int]]:
        return self._chunk(self._indices(self._rng(), batch_size), batch_size)
