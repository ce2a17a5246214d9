"""Automatic activation checkpointing (policies/activation_budget.py): the estimate against what was measured
on a GPU, the choice of layers, and real runs whose GPU budget is the one thing faked (there is no GPU here)."""
from __future__ import annotations

import pytest
import torch

from shardtune.policies import activation_budget as AB
from shardtune.policies.activation_budget import StepMemory, fewest_checkpointed, most_gathered, spread


def test_fewest_checkpointed_layers_fit_the_budget():
    mem = StepMemory(fixed=10, layer_activations=5, layer_input=1, n_layers=4)
    assert mem.peak(0) == 30 and mem.peak(4) == 10 + 4 + 5  # every layer: inputs plus one layer recomputing
    assert fewest_checkpointed(mem, 30) == 0
    assert fewest_checkpointed(mem, 29) == 2  # one checkpointed layer adds the recompute: 10 + 15 + 1 + 5 = 31
    assert fewest_checkpointed(mem, 19) == 4
    assert fewest_checkpointed(mem, 5) == 4  # nothing fits: every layer, and the plan says OVER
    assert spread(0, 16) == [] and spread(16, 16) == list(range(16))
    assert spread(4, 16) == [0, 4, 8, 12] and spread(3, 4) == [0, 1, 2]


def test_layers_kept_gathered_fill_the_room_checkpointing_leaves():
    """Two gathered layers are in ``fixed`` (the last one and the one backward prefetches); each further layer kept
    gathered adds its parameters, up to all of them."""
    mem = StepMemory(fixed=10, layer_activations=5, layer_input=1, n_layers=4, layer_gathered=2)
    assert mem.peak(0, 1) == mem.peak(0) == 30
    assert mem.peak(0, 2) == 32  # the last two kept, the third prefetched
    assert mem.peak(0, 3) == mem.peak(0, 4) == 34  # three kept and the fourth prefetched: all four, as when all kept
    assert most_gathered(mem, 0, 34) == 4 and most_gathered(mem, 0, 33) == 2 and most_gathered(mem, 0, 31) == 1
    assert most_gathered(mem, 0, 29) == 1  # no room at all: the last layer only, as always
    assert most_gathered(mem, 4, 19 + 4) == 4  # checkpointing leaves the room for the parameters
    # Not resharded after forward (SHARD_GRAD_OP): every layer's parameters are in ``fixed`` already.
    assert StepMemory(fixed=10, layer_activations=5, layer_input=1, n_layers=4).peak(0, 4) == 30


def _llama_1b_on_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.policies.wrapping import fsdp_units

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
    with torch.device("meta"):
        model = CausalLMWithLoss(AutoModelForCausalLM.from_config(config))
    return model, fsdp_units(model)


def test_estimate_for_llama_1b_is_at_or_above_what_was_measured():
    """Llama-3.2-1B shape, pure bf16, one H200, 4 x 4096 tokens (benchmarks/README.md, 2026-11-30): every layer
    checkpointed peaked at 12.8 GB allocated, none at 30.3 GB, so a layer's activations are about 1.1 GB. The
    estimate must not be below those (it decides what fits) nor far above (it would checkpoint for nothing)."""
    model, layers = _llama_1b_on_meta()
    mem = AB.estimate_step_memory(model, layers, "bf16_pure", tokens=4 * 4096, shard_size=1)
    assert mem.n_layers == 16
    assert 1.1e9 <= mem.layer_activations <= 2.2e9
    assert 12.8e9 <= mem.peak(16) <= 2 * 12.8e9
    assert 30.3e9 <= mem.peak(0) <= 1.6 * 30.3e9
    # Sharding divides the states (parameter, gradient, two AdamW moments: 8 bytes per bf16 parameter).
    halved = AB.estimate_step_memory(model, layers, "bf16_pure", tokens=4 * 4096, shard_size=2)
    params = sum(p.numel() for p in model.parameters())
    assert mem.fixed - halved.fixed == pytest.approx(params * 8 / 2, rel=1e-6)
    # Under PEFT only the adapters carry optimizer state; frozen weights count once, in the compute dtype.
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = AB.estimate_step_memory(model, layers, "bf16_mixed", tokens=4 * 4096, shard_size=1,
                                     frozen_in_compute_dtype=True)
    assert frozen.fixed < mem.fixed - params * 5


def test_unknown_block_shapes_get_no_estimate():
    from transformers import GPT2Config, GPT2LMHeadModel

    from shardtune.policies.wrapping import fsdp_units

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4))
    assert AB.estimate_step_memory(model, fsdp_units(model), "fp32", tokens=64, shard_size=1) is None


def test_off_cuda_there_is_no_budget():
    assert AB.device_budget(torch.device("cpu"), 0.5) is None


@pytest.mark.parametrize("budget, expected", [
    (10 ** 13, "on for 0 of 2 decoder layers (auto: estimated peak"),
    (1, "on for 2 of 2 decoder layers (auto: estimated peak"),
])
def test_auto_choice_in_a_real_run(tiny_llama_dir, tmp_path, capsys, monkeypatch, budget, expected):
    """A real single-process run with the GPU's budget faked: an ample budget checkpoints no layer, an
    impossible one every layer and says the estimate is over; the losses are those of every layer checkpointed."""
    from test_fsdp_support import step_losses

    from shardtune.finetuning import main

    common = dict(model_name=str(tiny_llama_dir), max_train_step=2, save_model=False, context_length=128,
                  num_epochs=1, save_metrics=True)  # validation on and the CPU's precision, as users get them
    main(output_dir=str(tmp_path / "all"), **{"fsdp_config.ac_every_n_layers": 1}, **common)
    assert "activation checkpointing on for 2 of 2 decoder layers (--fsdp_config.ac_every_n_layers 1)" \
        in capsys.readouterr().out
    monkeypatch.setattr(AB, "device_budget", lambda device, fraction: budget)
    main(output_dir=str(tmp_path / "auto"), **common)
    out = capsys.readouterr().out
    assert expected in out
    assert ("OVER the budget" in out) == (budget == 1)
    assert step_losses(tmp_path / "auto") == pytest.approx(step_losses(tmp_path / "all"), abs=1e-6)


def _agreed(rank: int, world: int) -> dict:
    from shardtune.utils.distributed import agree

    cpu = torch.device("cpu")
    return {"min": agree(10 + rank, cpu, op="min"), "max": agree(10 + rank, cpu, op="max")}


def test_ranks_agree_on_the_smallest_budget(tmp_path):
    """The budget (and the stop signal) is one value for all ranks: 2 gloo ranks holding 10 and 11 both get 10 as
    the minimum (and 11 as the maximum); one process keeps its own value."""
    from test_fsdp_support import run_fn_ranks

    from shardtune.utils.distributed import agree

    assert run_fn_ranks(_agreed, 2, tmp_path) == [{"min": 10, "max": 11}] * 2
    assert agree(7, torch.device("cpu"), op="min") == 7
