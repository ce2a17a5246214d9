"""Automatic activation checkpointing (policies/activation_budget.py): the estimate against what was measured
on a GPU, the choice of layers, and real runs whose GPU budget is the one thing faked (there is no GPU here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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


def _benchmark_shapes() -> dict:
    """The Llama 3 geometries the GPU benchmarks build (benchmarks/make_random_model.py: SHAPES)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "make_random_model.py"
    spec = importlib.util.spec_from_file_location("make_random_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SHAPES


def _llama_on_meta(shape: str = "llama3.2-1b"):
    """A Llama 3 geometry (benchmarks/make_random_model.py's table) on the meta device, and its decoder layers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.policies.wrapping import fsdp_units

    with torch.device("meta"):
        model = CausalLMWithLoss(AutoModelForCausalLM.from_config(LlamaConfig(**_benchmark_shapes()[shape])))
    return model, fsdp_units(model)


def test_estimate_for_llama_1b_is_at_or_above_what_was_measured():
    """Llama-3.2-1B shape, pure bf16, one H200, 4 x 4096 tokens (benchmarks/README.md, 2026-11-30): every layer
    checkpointed peaked at 12.8 GB allocated, none at 30.3 GB, so a layer's activations are about 1.1 GB. The
    estimate must not be below those (it decides what fits) nor far above (it would checkpoint for nothing)."""
    model, layers = _llama_on_meta()
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
    assert AB.device_budget(torch.device("cpu"), 0.0) is None


def test_default_budget_is_the_conventional_step_and_a_fraction_replaces_it():
    """ac_memory_fraction 0 (the default): the budget is the step with every layer checkpointed plus what a loss over
    whole logits holds, capped by the GPU; a fraction hands the GPU's share to the plan instead."""
    mem = StepMemory(fixed=10, layer_activations=5, layer_input=1, n_layers=4, layer_gathered=2, whole_logits_loss=8)
    assert mem.conventional() == mem.peak(4, 1) + 8 == 27
    assert AB.step_budget(10 ** 6, mem, 0.0) == 27
    assert AB.step_budget(25, mem, 0.0) == 25  # the GPU has less: the GPU's budget
    assert AB.step_budget(10 ** 6, mem, 0.5) == 10 ** 6
    assert AB.step_budget(40, None, 0.0) == 40  # no estimate: every layer is checkpointed anyway
    # The whole-logits memory buys recomputation back: 27 fits two checkpointed layers (10 + 2 x 5 kept + 2 x 1
    # inputs + 5 recomputing), not one (31).
    assert fewest_checkpointed(mem, mem.conventional()) == 2
    # Without it (a small vocabulary: one chunk holds every logit) the default checkpoints every layer.
    assert fewest_checkpointed(StepMemory(10, 5, 1, 4, 2, 0), mem.peak(4)) == 4


# What the reference (llama-cookbook 0.0.5.post1) reserved, one H200, 4 x 4096 packed tokens (benchmarks/README.md,
# 2026-12-04): the default budget must be at or under it, and buy back recomputation.
REFERENCE_RESERVED_GB = {("llama3.2-1b", "full"): 42, ("llama3.2-1b", "lora"): 31, ("llama3.2-3b", "full"): 52,
                         ("llama3.1-8b", "full"): 104, ("llama3.1-8b", "lora"): 49}


@pytest.mark.parametrize("shape, mode", sorted(REFERENCE_RESERVED_GB))
def test_default_budget_stays_within_the_reference_memory_and_checkpoints_fewer_layers(shape, mode):
    """At the measured shapes the default (conventional) budget is below what the reference reserved on the same
    command, by the margin the compiled estimate has measured under reserved memory (up to 6%), and still leaves
    layers uncheckpointed: every one at 1B, where the chunked loss saves more than all activations take."""
    model, layers = _llama_on_meta(shape)
    full = mode == "full"
    for p in model.parameters():
        p.requires_grad_(full)
    mem = AB.estimate_step_memory(model, layers, "bf16_pure" if full else "bf16_mixed", tokens=4 * 4096,
                                  shard_size=1, frozen_in_compute_dtype=not full, compiled=True)
    budget = mem.conventional()
    assert budget * 1.06 <= REFERENCE_RESERVED_GB[shape, mode] * AB.GB
    k = fewest_checkpointed(mem, budget)
    assert k < mem.n_layers
    if shape == "llama3.2-1b":
        assert k == 0
    # Half an H200 (the old default) was more than the reference's memory at 3B and less at 8B full.
    assert (budget < 0.5 * 140 * AB.GB) == (shape != "llama3.1-8b" or mode == "lora")


def test_compiled_layers_are_estimated_at_what_they_were_measured_to_save():
    """Llama-3.2-1B shape under torch.compile saved 71 KB per token and layer (H200, 16K tokens): the compiled
    estimate is at or just above that; the eager one is the larger, eager, figure."""
    model, layers = _llama_on_meta()
    tokens = 4 * 4096
    compiled = AB.estimate_step_memory(model, layers, "bf16_pure", tokens=tokens, shard_size=1, compiled=True)
    eager = AB.estimate_step_memory(model, layers, "bf16_pure", tokens=tokens, shard_size=1)
    assert 71e3 <= compiled.layer_activations / tokens <= 1.05 * 71e3
    assert eager.layer_activations / tokens > 1.4 * 71e3
    assert compiled.fixed == eager.fixed and compiled.whole_logits_loss == eager.whole_logits_loss
    # 10 bytes per logit (bf16 logits, their fp32 copy, fp32 log-probabilities) less the chunked loss's 3 chunks.
    assert eager.whole_logits_loss == tokens * 128256 * 10 - 3 * 2 ** 30


def _plan(monkeypatch, gpu_budget, shard_size, **fsdp):
    from shardtune.configs.run import RunConfigs

    run = RunConfigs()
    run.train.batch_size_training, run.train.context_length = 4, 4096
    for k, v in fsdp.items():
        setattr(run.fsdp, k, v)
    monkeypatch.setattr(AB, "device_budget", lambda device, fraction: gpu_budget)
    model, layers = _llama_on_meta()
    return AB.plan_memory(model, layers, run, "bf16_pure", torch.device("cpu"), shard_size)


def test_one_rank_keeps_only_the_last_layer_gathered_and_several_fill_the_room(monkeypatch):
    """On one rank the plan keeps no layer gathered beyond the last (its all-gather is a local copy), whatever room
    there is; sharded over 2 with a whole GPU's room (a fraction) it keeps all 16; an explicit count is obeyed."""
    one = _plan(monkeypatch, 10 ** 12, 1)
    assert one.gathered == 1 and "one rank" in one.gathered_reason
    assert "logits" in one.reason and 0 < len(one.layers) < 16  # eager (not compiled) layers
    two = _plan(monkeypatch, 10 ** 12, 2, ac_memory_fraction=1.0)
    assert two.gathered == 16 and two.layers == [] and "ac_memory_fraction 1.0" in two.reason
    assert _plan(monkeypatch, 10 ** 12, 1, keep_gathered_layers=3).gathered == 3


@pytest.mark.parametrize("budget, fsdp, expected", [
    (10 ** 13, {}, "2 of 2"),  # the tiny vocabulary saves nothing
    (10 ** 13, {"fsdp_config.ac_memory_fraction": 1.0}, "0 of 2"),
    (1, {}, "2 of 2"),
])
def test_auto_choice_in_a_real_run(tiny_llama_dir, tmp_path, capsys, monkeypatch, budget, fsdp, expected):
    """A real single-process run with the GPU's budget faked: by default the tiny model (2,048-token vocabulary:
    its chunked loss saves nothing) is checkpointed as the conventional step is; a whole (ample) GPU's budget
    checkpoints no layer; an impossible one every layer and says the estimate is over. (That checkpointing changes
    no loss: test_training.py in one process, test_fsdp.py and test_speed_levers.py on 2 ranks.)"""
    from test_fsdp_support import ac_decision

    from shardtune.finetuning import main

    common = dict(model_name=str(tiny_llama_dir), max_train_step=2, save_model=False, context_length=128,
                  num_epochs=1, save_metrics=True)  # validation on and the CPU's precision, as users get them
    monkeypatch.setattr(AB, "device_budget", lambda device, fraction: budget)
    main(output_dir=str(tmp_path / "auto"), **common, **fsdp)
    auto = ac_decision(capsys.readouterr().out)
    assert expected in auto and "auto" in auto and "estimated peak" in auto, auto
    assert ("OVER" in auto) == (budget == 1), auto


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
