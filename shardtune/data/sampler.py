"""Batch samplers for one process or N ranks.

* Every epoch reshuffles from a private RNG seeded with (seed, epoch): no global RNG is read or
  reseeded (the reference reseeded Python's global ``random``), and all ranks compute the same order
  without communicating. Call ``set_epoch(epoch)`` before each epoch.
* Rank r takes batches r, r + W, r + 2W, ... of that common list, so ranks' batches are disjoint
  and together cover the data set.
* Every rank yields the same number of batches, because FSDP needs every rank to run the same
  number of forward passes. Ranks left one short get a *filler* batch: the indices of a real batch
  shifted by ``num_samples``. The loader (data/loader.py) turns a filler into a batch whose labels
  are all -100, so it adds 0 to the loss and 0 to the token count. Nothing is dropped, in training
  or evaluation.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, List, Sequence

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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> random.Random:
        return random.Random(self.seed * 1_000_003 + self.epoch)

    def _indices(self, rng: random.Random) -> List[int]:
        """This epoch's sample order (shuffled when training), cut to whole batches with drop_last."""
        order = list(range(self.num_samples))
        if self.shuffle:
            rng.shuffle(order)
        if self.drop_last:
            order = order[: len(order) - len(order) % self.batch_size]
        return order

    def _chunk(self, order: List[int]) -> List[List[int]]:
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def batches(self) -> List[List[int]]:
        """All ranks' batches of this epoch, in order (identical on every rank)."""
        raise NotImplementedError

    def num_batches(self) -> int:
        """Batches of all ranks together in one epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.num_batches() / self.num_replicas)

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.batches()
        mine = batches[self.rank::self.num_replicas]
        yield from mine
        for _ in range(len(self) - len(mine)):  # at most one: see the module docstring
            yield [i + self.num_samples for i in batches[0]]


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

    def batches(self) -> List[List[int]]:
        rng = self._rng()
        order = sorted(self._indices(rng), key=self.lengths.__getitem__)  # stable: ties keep the random order
        batches = self._chunk(order)
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

    def batches(self) -> List[List[int]]:
        return self._chunk(self._indices(self._rng()))
