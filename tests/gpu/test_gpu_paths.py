"""What only a GPU can exercise: bf16 autocast and FSDP mixed precision, fused AdamW, NCCL, --low_cpu_fsdp,
CPU offload, resume with CUDA RNG, the packed-document attention kernels, the profiler and FLOP counter on
CUDA, and the benchmark harness. Runs use the tiny Llama of tests/conftest.py (GQA, head size 16)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from gpu.gpu_support import REPO, launch, quick_flags, save_llama
from test_fsdp_support import step_losses

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
two_gpus = pytest.mark.skipif(NGPU < 2, reason=f"needs 2 GPUs, found {NGPU}")
EAGER = ["--torch_compile", "False"]


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-8)


# ---------------------------------------------------------------------------------------------
# Precision, optimizer
# ---------------------------------------------------------------------------------------------
def test_default_bf16_autocast_single_process_tracks_fp32(tiny_llama_dir, tmp_path):
    """The defaults on one GPU (bf16_mixed through autocast, flex attention, compiled layers) against fp32."""
    log = launch(quick_flags(tiny_llama_dir), tmp_path / "bf16")
    assert "precision bf16_mixed" in log and "--> attention: flex_attention" in log and "torch.compile: 2" in log
    launch(quick_flags(tiny_llama_dir, precision="fp32", attn_implementation="sdpa") + EAGER, tmp_path / "fp32")
    bf16, fp32 = step_losses(tmp_path / "bf16"), step_losses(tmp_path / "fp32")
    assert len(bf16) == len(fp32) == 3
    assert all(_rel(a, b) < 2e-2 for a, b in zip(bf16, fp32)), (bf16, fp32)


def test_bf16_mixed_under_fsdp_matches_autocast(tiny_llama_dir, tmp_path):
    """FSDP's MixedPrecisionPolicy (bf16 params for compute, fp32 master and reduction) vs autocast."""
    launch(quick_flags(tiny_llama_dir, enable_fsdp=True), tmp_path / "fsdp", nproc=1)
    launch(quick_flags(tiny_llama_dir), tmp_path / "autocast")
    fsdp, autocast = step_losses(tmp_path / "fsdp"), step_losses(tmp_path / "autocast")
    assert all(_rel(a, b) < 2e-2 for a, b in zip(fsdp, autocast)), (fsdp, autocast)


def test_fused_adamw_on_cuda_matches_foreach():
    from shardtune.configs.parse import parse_cli
    from shardtune.policies.optimizer import build_optimizer

    run = parse_cli({"lr": 1e-2})
    torch.manual_seed(0)
    fused_model = torch.nn.Linear(64, 32).cuda()
    plain_model = torch.nn.Linear(64, 32).cuda()
    plain_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, run, torch.device("cuda"))
    assert all(g.get("fused") for g in fused.param_groups)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.0, foreach=True)
    x = torch.randn(16, 64, device="cuda")
    for _ in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Several processes: NCCL, low_cpu_fsdp, CPU offload, resume
# ---------------------------------------------------------------------------------------------
@two_gpus
def test_nccl_two_ranks_equal_one_rank_with_twice_the_batch(tiny_llama_dir, tmp_path):
    common = dict(enable_fsdp=True, precision="fp32", attn_implementation="sdpa")
    launch(quick_flags(tiny_llama_dir, batch_size_training=1, **common) + EAGER, tmp_path / "two", nproc=2)
    launch(quick_flags(tiny_llama_dir, batch_size_training=2, **common) + EAGER, tmp_path / "one", nproc=1)
    two, one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert len(two) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(two, one)), (two, one)


@two_gpus
def test_low_cpu_fsdp_over_nccl_matches_normal_loading(tiny_llama_dir, tmp_path):
    common = dict(enable_fsdp=True, precision="bf16_mixed")
    log = launch(quick_flags(tiny_llama_dir, low_cpu_fsdp=True, **common) + EAGER, tmp_path / "low", nproc=2)
    assert "received from rank 0" in log
    launch(quick_flags(tiny_llama_dir, **common) + EAGER, tmp_path / "normal", nproc=2)
    low, normal = step_losses(tmp_path / "low"), step_losses(tmp_path / "normal")
    assert all(abs(a - b) < 1e-3 for a, b in zip(low, normal)), (low, normal)


def test_cpu_offload_matches_gpu_resident(tiny_llama_dir, tmp_path):
    nproc = min(2, NGPU)
    common = dict(enable_fsdp=True, precision="fp32", attn_implementation="sdpa")
    launch(quick_flags(tiny_llama_dir, **{"fsdp_config.fsdp_cpu_offload": True}, **common) + EAGER,
           tmp_path / "offload", nproc=nproc)
    launch(quick_flags(tiny_llama_dir, **common) + EAGER, tmp_path / "gpu", nproc=nproc)
    off, gpu = step_losses(tmp_path / "offload"), step_losses(tmp_path / "gpu")
    assert all(abs(a - b) < 1e-4 for a, b in zip(off, gpu)), (off, gpu)


def test_resume_with_cuda_rng_reproduces_the_uninterrupted_run(tiny_llama_dir, tmp_path):
    """LoRA dropout draws from the CUDA RNG: resumed steps 3-4 equal the uninterrupted run only if the
    checkpoint restored it. fp32 + SDPA, uncompiled, so that the kernels themselves are repeatable."""
    nproc = min(2, NGPU)
    common = quick_flags(tiny_llama_dir, enable_fsdp=True, precision="fp32", attn_implementation="sdpa",
                         use_peft=True) + EAGER
    launch(common + ["--max_train_step", 4], tmp_path / "A", nproc=nproc)
    launch(common + ["--max_train_step", 2, "--save_every_n_steps", 2], tmp_path / "B", nproc=nproc)
    log = launch(common + ["--max_train_step", 4, "--resume_from", "auto"], tmp_path / "B", nproc=nproc)
    assert "--> resuming from" in log
    a, b = step_losses(tmp_path / "A"), step_losses(tmp_path / "B")
    assert len(a) == 4 and len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    # control: a different seed (other dropout masks, other data order) moves the losses far more
    launch(common + ["--max_train_step", 4, "--seed", 7], tmp_path / "C", nproc=nproc)
    assert max(abs(x - y) for x, y in zip(a, step_losses(tmp_path / "C"))) > 1e-3


# ---------------------------------------------------------------------------------------------
# Packed-document attention
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attn_llama_dir(tmp_path_factory):
    """Llama-like heads (64 wide, GQA 4/2), 2 layers: the shapes the fast kernels are built for."""
    return save_llama(tmp_path_factory.mktemp("attn_llama"), hidden_size=256, intermediate_size=512,
                      num_attention_heads=4, num_key_value_heads=2)


def _packed_block():
    """Five documents of 37..300 tokens and a padding tail in one 1024-token block."""
    from shardtune.data.collate import packed_collator
    from shardtune.data.packing import pack_dataset

    g = torch.Generator().manual_seed(0)
    docs = []
    for n in (300, 37, 150, 211, 90):
        ids = torch.randint(3, 2000, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    (block,) = [packed_collator([b]) for b in pack_dataset(docs, 1024, pad_token_id=0)]
    return {k: v.cuda() for k, v in block.items()}


def _model(model_dir, attn, dtype, compile_layers=False):
    from transformers import AutoModelForCausalLM

    from shardtune.models.loss import CausalLMWithLoss

    model = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn,
                                                                  dtype=dtype)).cuda()
    if compile_layers:
        from shardtune.policies.compile import compile_decoder_layers

        compile_decoder_layers(model)
    return model


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_document_loss_in_a_packed_block_equals_its_loss_alone(attn, attn_llama_dir):
    """Each document's loss inside the packed block (``attn``) equals its loss alone through plain causal SDPA
    (no mask at all: the ground truth). fp32. The alone pass uses SDPA because FlexAttention recompiles for
    every new length and, for short fp32 sequences, inductor 2.11 finds no flex-decoding kernel (measured)."""
    model = _model(attn_llama_dir, attn, torch.float32)
    plain = _model(attn_llama_dir, "sdpa", torch.float32)
    block = _packed_block()
    starts = (block["position_ids"][0] == 0).nonzero().flatten().tolist() + [block["input_ids"].shape[1]]
    with torch.no_grad():
        for begin, end in zip(starts[:-2], starts[1:-1]):  # every document (the last start is the padding tail)
            only = torch.full_like(block["labels"], -100)
            only[:, begin:end] = block["labels"][:, begin:end]
            packed = model(input_ids=block["input_ids"], labels=only, position_ids=block["position_ids"])
            alone = plain(input_ids=block["input_ids"][:, begin:end], labels=block["labels"][:, begin:end])
            assert float(packed.loss_sum) == pytest.approx(float(alone.loss_sum), rel=1e-4)


def test_flex_path_matches_sdpa_path_in_bf16_loss_and_gradients(attn_llama_dir):
    """The fast path (flex_attention, compiled layers) against transformers' SDPA + 4-D mask path."""
    block = _packed_block()
    results = {}
    for name, attn, compiled in (("sdpa", "sdpa", False), ("flex", "flex_attention", False),
                                 ("flex_compiled", "flex_attention", True)):
        model = _model(attn_llama_dir, attn, torch.bfloat16, compile_layers=compiled)
        out = model(**block)
        out.loss_sum.backward()
        grad = model.base_model.model.layers[0].self_attn.q_proj.weight.grad.float()
        results[name] = (float(out.loss_sum.detach()) / int(out.num_tokens), grad)
    ref_loss, ref_grad = results["sdpa"]
    for name in ("flex", "flex_compiled"):
        loss, grad = results[name]
        assert loss == pytest.approx(ref_loss, rel=1e-2), name
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


# ---------------------------------------------------------------------------------------------
# Observability and the benchmark harness
# ---------------------------------------------------------------------------------------------
def test_profiler_traces_cuda_kernels(tiny_llama_dir, tmp_path):
    import gzip

    launch(quick_flags(tiny_llama_dir, use_profiler=True, max_train_step=7), tmp_path / "prof")
    traces = sorted((tmp_path / "prof" / "profiler").glob("rank0.*.pt.trace.json*"))
    assert traces, list((tmp_path / "prof").rglob("*"))
    raw = traces[-1].read_bytes()
    text = (gzip.decompress(raw) if traces[-1].suffix == ".gz" else raw).decode(errors="replace")
    assert '"cat": "kernel"' in text or '"cat":"kernel"' in text  # GPU kernels, not only CPU ops


@pytest.mark.parametrize("compiled", [False, True])
def test_flop_counter_on_cuda_matches_the_analytic_count(compiled, tiny_llama_dir, tmp_path):
    flags = quick_flags(tiny_llama_dir, flop_counter=True, flop_counter_start=2, max_train_step=4,
                        attn_implementation="sdpa", torch_compile=compiled)
    launch(flags, tmp_path / "fc")
    fc = json.loads((tmp_path / "fc" / "summary.json").read_text())["flop_counter"]
    assert fc["measured_flops"] / fc["expected_flops"] == pytest.approx(1.0, abs=0.1), fc
    assert fc["mfu"] is not None and 0 < fc["mfu"] < 1


def test_benchmark_harness_short_mode(tmp_path):
    reference = os.environ.get("SHARDTUNE_REFERENCE_SH", "")
    cmd = [sys.executable, str(REPO / "benchmarks" / "vs_reference.py"), "--short", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--reference", reference]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=580,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| shardtune full_ac" in table
    if reference:
        assert "| reference full_ac" in table and "x |" in table  # a ratio was computed


# ---------------------------------------------------------------------------------------------
# Automatic activation checkpointing (policies/activation_budget.py)
# ---------------------------------------------------------------------------------------------
def _four_layer_model_and_estimate(tmp_path, shard_size: int):
    """A 4-layer Llama written to tmp_path/model, the micro-batch the memory-plan tests train with, and the plan's
    estimate for it in pure bf16 with ``shard_size`` ranks sharing the parameters (compiled layers, as on CUDA by
    default)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.policies import activation_budget as AB
    from shardtune.policies.wrapping import fsdp_units

    model_dir = save_llama(tmp_path / "model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                           num_attention_heads=16, num_key_value_heads=4)
    batch, context = 8, 1024
    with torch.device("meta"):
        model = CausalLMWithLoss(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))
    mem = AB.estimate_step_memory(model, fsdp_units(model), "bf16_pure", tokens=batch * context, shard_size=shard_size,
                                  compiled=True)
    return model_dir, batch, context, mem


def test_auto_activation_checkpointing_plans_within_its_budget_and_near_the_measured_peak(tmp_path):
    """On a GPU, with the auto choice: (1) a budget set between the estimates for checkpointing 1 and 2 of 4 layers
    makes the run checkpoint exactly 2, and the log gives the numbers; a whole GPU checkpoints none; (2) by default
    the budget is the conventional step's (every layer checkpointed, the loss over whole logits), and with this
    model's 2,048-token vocabulary the chunked loss saves nothing, so every layer is checkpointed; (3) the estimate is
    close to what the run reserved: each run's peak reserved memory is at most 10% above its plan's estimate."""
    import re

    model_dir, batch, context, mem = _four_layer_model_and_estimate(tmp_path, shard_size=1)
    total = torch.cuda.mem_get_info()[1]
    fraction = (mem.peak(2) + mem.peak(1)) / 2 / total  # room for 2 checkpointed layers, not for 1
    flags = quick_flags(model_dir, enable_fsdp=True, batch_size_training=batch, context_length=context,
                        **{"fsdp_config.pure_bf16": True})
    for name, extra, expected in (("two", ["--fsdp_config.ac_memory_fraction", f"{fraction:.6f}"], 2),
                                  ("none", ["--fsdp_config.ac_memory_fraction", "1"], 0),
                                  ("default", [], 4)):
        log = launch(flags + extra, tmp_path / name, nproc=1)
        m = re.search(r"activation checkpointing on for (\d+) of 4 decoder layers \(auto: estimated peak ([0-9.]+) GB "
                      r"within the budget ([0-9.]+) GB([^;]*)", log)
        assert m and int(m.group(1)) == expected, log[-3000:]
        assert ("loss over whole logits" in m.group(4)) == (name == "default"), m.group(0)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["peak_reserved_gb"] <= 1.1 * float(m.group(2)), (name, summary["peak_reserved_gb"], m.group(2))


@two_gpus
def test_auto_plan_keeps_layers_gathered_within_its_budget_and_changes_no_loss(tmp_path):
    """2 GPUs, FULL_SHARD, the default auto plan: a budget set between the estimates for keeping 2 and 3 of 4 layers
    gathered (with room for no checkpointing) keeps exactly 2, says so, peaks below its estimate, and trains with the
    same losses as keeping only the last layer (--fsdp_config.keep_gathered_layers 1)."""
    import re

    model_dir, batch, context, mem = _four_layer_model_and_estimate(tmp_path, shard_size=2)
    fraction = (mem.peak(0, 2) + mem.peak(0, 3)) / 2 / torch.cuda.mem_get_info()[1]
    flags = quick_flags(model_dir, enable_fsdp=True, batch_size_training=batch, context_length=context,
                        **{"fsdp_config.pure_bf16": True, "fsdp_config.ac_memory_fraction": f"{fraction:.6f}"})
    log = launch(flags, tmp_path / "auto", nproc=2)
    assert "activation checkpointing on for 0 of 4 decoder layers" in log, log[-3000:]
    m = re.search(r"the last (\d+) of 4 decoder layers stay gathered from forward to backward \(auto: estimated peak "
                  r"([0-9.]+) GB within", log)
    assert m and int(m.group(1)) == 2, log[-3000:]
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["peak_allocated_gb"] <= float(m.group(2)), (summary["peak_allocated_gb"], m.group(2))
    launch(flags + ["--fsdp_config.keep_gathered_layers", "1"], tmp_path / "one", nproc=2)
    assert step_losses(tmp_path / "auto") == pytest.approx(step_losses(tmp_path / "one"), abs=1e-5)
