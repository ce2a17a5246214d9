"""Samplers, collators and loaders for 1, 2 and 4 simulated ranks, and short real training runs."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from test_fsdp_support import step_losses as _step_losses

from shardtune.data.collate import PaddingCollator
from shardtune.data.loader import build_dataloader
from shardtune.data.sampler import LengthBasedBatchSampler, RandomBatchSampler
from shardtune.models.loss import IGNORE_INDEX

PAD = 0


def _samples(n: int, seed: int = 0) -> list:
    """Sample i is the token i + 10 repeated (so batches can be traced back), with a 1-token prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(2, 12)
        out.append({"input_ids": [i + 10] * length, "labels": [IGNORE_INDEX] + [i + 10] * (length - 1)})
    return out


def _sampler(kind: str, data: list, batch_size: int, world: int, rank: int, shuffle: bool, seed: int = 3):
    if kind == "length":
        return LengthBasedBatchSampler(data, batch_size, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    return RandomBatchSampler(len(data), batch_size, shuffle=shuffle, seed=seed, num_replicas=world, rank=rank)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("kind", ["length", "random"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n", [1, 13, 24])
def test_ranks_get_disjoint_batches_that_cover_the_data_and_equal_counts(world, kind, shuffle, n):
    data, bs = _samples(n), 3
    per_rank = []
    for rank in range(world):
        sampler = _sampler(kind, data, bs, world, rank, shuffle)
        sampler.set_epoch(2)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1, "every rank must run the same number of forward passes"
    real = [i for batches in per_rank for b in batches for i in b if i < n]
    assert sorted(real) == list(range(n)), "each sample exactly once over all ranks"
    for batches in per_rank:
        fillers = [b for b in batches if b[0] >= n]
        assert len(fillers) <= 1 and (not fillers or batches[-1] is fillers[0])  # one at most, at the end
        assert all(i >= n for b in fillers for i in b) and all(1 <= len(b) <= bs for b in batches)


@pytest.mark.parametrize("kind", ["length", "random"])
def test_every_epoch_reshuffles_without_touching_global_rng(kind):
    data = _samples(40)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    sampler = _sampler(kind, data, 4, 1, 0, shuffle=True)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    assert epochs[0] != epochs[1] != epochs[2]
    again = _sampler(kind, data, 4, 1, 0, shuffle=True)
    again.set_epoch(1)
    assert list(again) == epochs[1], "a fresh sampler (another rank, a resumed run) reproduces the epoch"
    random.seed(1234)  # global RNG state must not matter either
    assert list(again) == epochs[1]
    if kind == "length":  # batch contents change between epochs, not only their order
        assert {tuple(sorted(b)) for b in epochs[0]} != {tuple(sorted(b)) for b in epochs[1]}
    eval_sampler = _sampler(kind, data, 4, 1, 0, shuffle=False)
    eval_sampler.set_epoch(5)
    assert sorted(i for b in eval_sampler for i in b) == list(range(40))


def test_length_based_batches_group_similar_lengths():
    data = _samples(200)
    lengths = [len(s["input_ids"]) for s in data]
    sampler = LengthBasedBatchSampler(data, 8, shuffle=True, seed=0)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in sampler]
    assert max(spread) <= 1
    evaluation = list(LengthBasedBatchSampler(data, 8, shuffle=False))
    assert [lengths[b[0]] for b in evaluation] == sorted(lengths[b[0]] for b in evaluation)  # short to long
    assert len(list(LengthBasedBatchSampler(data, 8, drop_last=True))) == 200 // 8


def test_bigger_batch_equals_accumulated_and_distributed_micro_batches():
    """RandomBatchSampler: step k of batch 8 = micro-batches 4k..4k+3 of batch 2 = ranks' batch 4 at step k."""
    n = 50
    big = RandomBatchSampler(n, 8, seed=7)
    small = RandomBatchSampler(n, 2, seed=7)
    ranks = [RandomBatchSampler(n, 4, seed=7, num_replicas=2, rank=r) for r in range(2)]
    for s in (big, small, *ranks):
        s.set_epoch(1)
    big_b, small_b = list(big), list(small)
    rank_b = [list(s) for s in ranks]
    for k, batch in enumerate(big_b):
        assert batch == [i for mb in small_b[4 * k:4 * k + 4] for i in mb]
        assert batch == [i for r in range(2) if k < len(rank_b[r]) for i in rank_b[r][k] if i < n]


def test_padding_collator_truncates_and_pads_labels_with_ignore_index():
    collate = PaddingCollator(pad_token_id=PAD, max_length=4)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "length": 5},
                     {"input_ids": [5, 6], "labels": [-100, 6]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8], [-100, 6, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def _cfg(strategy: str, **kw):
    from shardtune.configs import train_config

    fields = dict(batching_strategy=strategy, context_length=16, batch_size_training=2, val_batch_size=2,
                  num_workers_dataloader=0, seed=5)
    return train_config(**{**fields, **kw})


_TOKENIZER = SimpleNamespace(pad_token_id=PAD, eos_token_id=2)


@pytest.mark.parametrize("strategy", ["padding", "packing"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_loaders_see_every_sample_once_and_fill_short_ranks_with_masked_batches(strategy, world, train):
    """Under FSDP every rank runs the same number of batches; fillers carry labels -100 only (0 loss, 0 tokens)."""
    data = _samples(9 if strategy == "padding" else 23)
    cfg = _cfg(strategy)
    seen, counts, fillers = [], [], 0
    for rank in range(world):
        loader = build_dataloader(data, _TOKENIZER, cfg, train=train, rank=rank, world_size=world)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == len(loader)
        for batch in batches:
            supervised = batch["labels"][batch["labels"] != IGNORE_INDEX]
            if supervised.numel() == 0:
                fillers += 1
                assert (batch["input_ids"] != PAD).any(), "a filler is a real batch, masked"
            seen += [t - 10 for t in torch.unique(supervised).tolist()]
    assert len(set(counts)) == 1
    assert sorted(seen) == list(range(len(data)))
    assert fillers == counts[0] * world - loader.batch_sampler.num_batches()


@pytest.mark.parametrize("strategy", ["padding", "packing"])
def test_eval_loss_over_ranks_with_fillers_equals_one_process(strategy, tiny_llama_dir):
    """Summing loss and tokens over 1, 2 or 4 simulated ranks (fillers included) gives one eval loss."""
    from transformers import AutoModelForCausalLM

    from shardtune.models.loss import CausalLMWithLoss

    model = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)).eval()
    data = [{"input_ids": [1] + s["input_ids"], "labels": [IGNORE_INDEX] + s["labels"]} for s in _samples(11)]
    cfg = _cfg(strategy, val_batch_size=2)
    losses = []
    with torch.no_grad():
        for world in (1, 2, 4):
            outs = [model(**batch) for rank in range(world)
                    for batch in build_dataloader(data, _TOKENIZER, cfg, train=False, rank=rank, world_size=world)]
            losses.append(float(sum(o.loss_sum for o in outs)) / int(sum(o.num_tokens for o in outs)))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[2] == pytest.approx(losses[0], abs=1e-5)


def test_loader_settings_and_custom_collator_overrides_packing(capsys):
    data = _samples(6)
    loader = build_dataloader(data, _TOKENIZER, _cfg("packing"), train=True)
    assert loader.pin_memory == torch.cuda.is_available()
    threaded = build_dataloader(data, _TOKENIZER, _cfg("padding", num_workers_dataloader=2), train=True)
    assert threaded.prefetch_factor == 2 and threaded.num_workers == 2
    assert sorted(t - 10 for b in threaded for t in torch.unique(b["input_ids"]).tolist() if t) == list(range(6))

    def collate(samples):
        return {"n": torch.tensor(len(samples))}

    custom = build_dataloader(data, _TOKENIZER, _cfg("packing"), train=True, collate_fn=collate)
    assert [int(b["n"]) for b in custom] == [2, 2, 2]
    (warning,) = capsys.readouterr().err.splitlines()
    assert "packing" in warning and "collator" in warning
    prefix = build_dataloader(data, _TOKENIZER, _cfg("packing", use_peft=True, peft_method="prefix"), train=True)
    assert "attention_mask" in next(iter(prefix))  # padded batches: see data/loader.py for why
    (warning,) = capsys.readouterr().err.splitlines()
    assert "packing" in warning and "--peft_method prefix" in warning


@pytest.mark.parametrize("strategy", ["packing", "padding"])
def test_tiny_model_trains_on_alpaca_with_falling_loss(strategy, tiny_llama_dir, tmp_path):
    from shardtune.finetuning import main

    summary = main(model_name=str(tiny_llama_dir), dataset="alpaca_dataset", batching_strategy=strategy,
                   context_length=128, batch_size_training=8, max_train_step=16, lr=2e-3, run_validation=False,
                   num_workers_dataloader=0, save_metrics=True, save_model=False, precision="fp32",
                   output_dir=str(tmp_path))
    losses = _step_losses(tmp_path)
    assert summary["steps"] == len(losses) == 16
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses
    assert list((tmp_path / "data_cache").glob("alpaca_dataset-train-*.arrow")), "tokenisation is cached"
