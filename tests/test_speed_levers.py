"""The GPU speed levers' CPU-checkable parts: flag validation, the attention choice, the allocator setting,
selective activation checkpointing and the stored dtypes of FSDP units. Their GPU effect is measured in
benchmarks/README.md and exercised in tests/gpu."""
from __future__ import annotations

import os

import pytest
import torch
from test_fsdp_support import ac_decision
from torch import nn

from shardtune.configs.parse import parse_cli, resolve_compile
from shardtune.errors import ConfigError
from shardtune.models.loading import pick_attention

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # pick_attention only looks at the device type


@pytest.mark.parametrize("flags, message", [
    ({"attn_implementation": "flash3"}, "--attn_implementation: expected one of auto | sdpa | flex_attention"),
    ({"torch_compile": "sometimes"}, "--torch_compile: expected one of"),
    ({"fsdp_config.ac_every_n_layers": -1}, r"--fsdp_config.ac_every_n_layers: must be in \[0, inf\)"),
    ({"fsdp_config.ac_memory_fraction": 1.5}, r"--fsdp_config.ac_memory_fraction: must be in \[0, 1\]"),
])
def test_bad_flag_values_get_one_line(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_cli(flags)


def test_torch_compile_auto_is_on_for_cuda_only():
    assert resolve_compile(parse_cli({}), CUDA) and not resolve_compile(parse_cli({}), CPU)
    assert resolve_compile(parse_cli({"torch_compile": True}), CPU)
    assert not resolve_compile(parse_cli({"torch_compile": "False"}), CUDA)


def test_attention_auto_choice(capsys):
    from transformers import GPT2Config, LlamaConfig

    assert pick_attention("auto", False, CUDA, LlamaConfig()) == "flex_attention"
    assert pick_attention("auto", False, CPU, LlamaConfig()) == "sdpa"
    assert pick_attention("auto", False, CUDA, LlamaConfig(), packing=False) == "sdpa"
    assert pick_attention("auto", False, CUDA, LlamaConfig(), prompt_learning=True) == "sdpa"
    # a model class that does not declare FlexAttention support gets SDPA, one that does gets FlexAttention
    from transformers import GPT2LMHeadModel

    gpt2_declares_flex = bool(getattr(GPT2LMHeadModel, "_supports_flex_attn", False))
    assert pick_attention("auto", False, CUDA, GPT2Config()) == ("flex_attention" if gpt2_declares_flex else "sdpa")
    assert pick_attention("eager", False, CUDA, LlamaConfig()) == "eager"


def test_flash_attention_2_without_the_package_is_one_line():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
        pick_attention("flash_attention_2", False, CUDA)


def test_allocator_setting_respects_the_user(monkeypatch):
    from shardtune.utils.distributed import ALLOCATOR_SETTING, configure_cuda_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert "expandable_segments:True" in configure_cuda_allocator()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ALLOCATOR_SETTING
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    assert "backend:cudaMallocAsync" in configure_cuda_allocator()  # the user's setting, reported
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"  # and kept


def test_unit_placer_keeps_trainable_masters_and_stores_frozen_weights_in_the_compute_dtype():
    from shardtune.policies.placement import UnitPlacer

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(torch.bfloat16)  # as read from a bf16 checkpoint
    model[0].requires_grad_(False)
    UnitPlacer("bf16_mixed", None, frozen_in_compute_dtype=True)(model.parameters())
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    UnitPlacer("bf16_mixed", None, frozen_in_compute_dtype=False)(model.parameters())  # full fine-tuning
    assert model[0].weight.dtype == torch.float32
    UnitPlacer("bf16_pure", CPU, frozen_in_compute_dtype=True)(model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _mapped_rss_bytes(path) -> int:
    """Resident bytes of ``path``'s mappings in this process (/proc/self/smaps); -1: the file is not mapped."""
    total, inside, found = 0, False, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == str(path)
                found = found or inside
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total if found else -1


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_unit_placer_gives_back_the_host_pages_of_the_weights_it_replaced(tmp_path):
    """from_pretrained leaves the weights in views of the mapped safetensors file, and a file's pages stay
    resident until its last tensor is freed: before the fix, every unit already placed (moved to the GPU, or
    cast as here) stayed in host RSS while its file still held an unplaced weight (8.3 GB per rank at 8B)."""
    from conftest import save_llama
    from transformers import AutoModelForCausalLM

    from shardtune.policies.placement import UnitPlacer, release_host_pages

    d = save_llama(tmp_path / "m", hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                   num_key_value_heads=8)  # fp32, one file; a decoder layer is 16.8 MB
    lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    weights = d / "model.safetensors"
    before = _mapped_rss_bytes(weights)
    if before < 0:
        pytest.skip("transformers no longer maps the checkpoint file")
    layer = lm.model.layers[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    UnitPlacer("bf16_pure", None, frozen_in_compute_dtype=False)(layer.parameters())  # reads every byte
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert lm.model.embed_tokens.weight.dtype == torch.float32  # still a view of the file: the mapping stays
    grown = _mapped_rss_bytes(weights) - before
    assert grown < layer_bytes / 4, (grown, layer_bytes)  # only pages shared with neighbours may stay
    # A storage that something else still uses (a view; --low_cpu_fsdp's state dict) keeps its pages.
    t = torch.randn(2 ** 20)  # anonymous memory: pages given back would read as zeros
    view, expected = t[:], t.clone()
    release_host_pages(t)
    assert torch.equal(view, expected)


def test_ac_every_n_layers_checkpoints_a_subset_with_unchanged_losses(tiny_llama_dir, tmp_path):
    """2 ranks (gloo), fp32: checkpointing 1 of 2 layers logs so and trains exactly like checkpointing both."""
    from test_fsdp_support import base_kwargs, run_ranks, step_losses

    ac = {"fsdp_config.fsdp_activation_checkpointing": True}
    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "all", **ac), tmp_path / "r_all")
    half = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "half", **ac, **{"fsdp_config.ac_every_n_layers": 2}),
                     tmp_path / "r_half")
    ac_line = ac_decision(half[0]["log"])
    assert "1 of 2" in ac_line and "--fsdp_config.ac_every_n_layers 2" in ac_line, ac_line
    assert step_losses(tmp_path / "half") == pytest.approx(step_losses(tmp_path / "all"), abs=1e-6)


def test_layers_kept_gathered_change_no_number(tiny_llama_dir, tmp_path):
    """2 ranks (gloo), fp32, validation and a sharded checkpoint on, as users get them: keeping both layers gathered
    from forward to backward logs so and gives the same training and evaluation losses as the default placement
    (off a GPU: the last layer only), and its checkpoint is written (and checked) alike."""
    from test_fsdp_support import base_kwargs, run_ranks, step_losses

    users = dict(run_validation=True, save_model=True)
    base = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "one", **users), tmp_path / "r_one")
    kept = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "two", **users,
                                    **{"fsdp_config.keep_gathered_layers": 2}), tmp_path / "r_two")
    assert "the last 1 of 2 decoder layers stay gathered from forward to backward (auto, no GPU memory to budget " \
           "on cpu)" in base[0]["log"]
    assert "the last 2 of 2 decoder layers stay gathered from forward to backward " \
           "(--fsdp_config.keep_gathered_layers 2)" in kept[0]["log"]
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)
    assert kept[0]["summary"]["eval_loss"] == pytest.approx(base[0]["summary"]["eval_loss"], abs=1e-6)
    assert base[0]["summary"]["eval_loss"]  # evaluation ran
    for out in ("one", "two"):
        assert any((tmp_path / out).rglob("*.distcp")), out  # the sharded checkpoint


def test_is_packed_tells_packed_loaders_from_padded_ones(bundled_tokenizer_dir):
    """The attention choice follows the loader: FlexAttention only where blocks are packed."""
    from transformers import AutoTokenizer

    from shardtune.configs.training import train_config
    from shardtune.data.loader import build_dataloader, is_packed

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir)
    samples = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 9, 12, 7)]
    for strategy, world in (("packing", 1), ("packing", 2), ("padding", 1)):
        cfg = train_config(batching_strategy=strategy, context_length=16, batch_size_training=1,
                           num_workers_dataloader=0)
        loader = build_dataloader(samples, tok, cfg, train=True, world_size=world)
        assert is_packed(loader) == (strategy == "packing"), (strategy, world)
