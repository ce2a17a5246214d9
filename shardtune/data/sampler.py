"""Batch samplers that reshuffle every epoch from (seed, epoch) without touching global RNG state.

All ranks compute the same permutation of batches and rank r takes every world_size-th batch, so the
ranks' batches are disjoint. Training drops only the last few batches that cannot be spread evenly
over the ranks (every rank must run the same number of steps); evaluation keeps every sample.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, List, Sequence

from torch.utils.data import Sampler


def _lengths(data: Sequence) -> List[int]:
    out = []
    for sample in data:
        if isinstance(sample, dict):
            out.append(len(sample["input_ids"] if "input_ids" in sample else next(iter(sample.values()))))
        else:
            out.append(len(sample))
    return out


class _EpochBatchSampler(Sampler[List[int]]):
    shuffle_batch_order = True  # length-grouped batches: shuffle which batch comes when
    def __init__(self, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> List[List[int]]:  # same on every rank
        raise NotImplementedError

    def _my_batches(self) -> List[List[int]]:
        batches = self._all_batches()
        if self.shuffle and self.shuffle_batch_order:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(batches)
        if self.drop_last:
            batches = batches[: len(batches) // self.num_replicas * self.num_replicas]
        return batches[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._my_batches())

    def __len__(self) -> int:
        n = self._num_batches()
        if self.drop_last:
            return n // self.num_replicas
        return len(range(self.rank, n, self.num_replicas))

    def _num_batches(self) -> int:
        raise NotImplementedError


class LengthBasedBatchSampler(_EpochBatchSampler):
    """Batches of similar length (sorted by length, chunked, batch order shuffled per epoch)."""

    def __init__(self, data_source: Sequence, batch_size: int, drop_last: bool = False, shuffle: bool = True,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(batch_size, num_replicas, rank, shuffle, seed, drop_last)
        self.lengths = _lengths(data_source)

    def _all_batches(self) -> List[List[int]]:
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _num_batches(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


class DistributedLengthBasedBatchSampler(LengthBasedBatchSampler):
    """The reference's name: a length-grouped sampler split over ranks."""

    def __init__(self, data_source: Sequence, batch_size: int, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        super().__init__(data_source, batch_size, drop_last=drop_last, shuffle=shuffle, seed=seed,
                         num_replicas=num_replicas, rank=rank)


class RandomBatchSampler(_EpochBatchSampler):
    """Plain shuffled batches (used for packed blocks, which all have the same length).

    Samples are shuffled and then chunked, so step k of batch size 8 holds the same samples as
    micro-batches 4k..4k+3 of batch size 2: gradient accumulation is equivalent to a bigger batch.
    """

    shuffle_batch_order = False

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = True):
        super().__init__(batch_size, num_replicas, rank, shuffle, seed, drop_last)
        self.num_samples = num_samples

    def _all_batches(self) -> List[List[int]]:
        order = list(range(self.num_samples))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch + 7).shuffle(order)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _num_batches(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)
