"""``shardtune plan`` (shardtune/planning/): its figures against torch's real tensors after a real step, its
checkpointing choice against a real run's with the same faked GPU budget, its JSON, its bad input, and the
Llama-3.1-70B plan of docs/planning.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fsdp_support import ac_decision

from shardtune.observability.memory import GB
from shardtune.planning.cli import plan_cli
from shardtune.policies import activation_budget as AB

REPO = Path(__file__).resolve().parent.parent
LLAMA_70B = REPO / "tests" / "fixtures" / "llama-3.1-70b"
SESSION6 = REPO / "benchmarks" / "results" / "vs_reference_h200_s6_2026-12-04.json"


def plan_json(capsys, *argv) -> dict:
    assert plan_cli(["--plan_json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("peft", [False, True])
def test_states_per_gpu_are_the_bytes_of_a_real_step(tiny_llama_dir, capsys, peft):
    """One GPU, fp32: the plan's parameters, gradients and optimizer state equal the bytes of the run's own model
    and optimizer after one real step on CPU (full fine-tuning, and LoRA, where only the adapters train)."""
    from shardtune.configs.parse import parse_cli
    from shardtune.models.builder import WeightSource, build_model
    from shardtune.models.loading import load_tokenizer
    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.policies.optimizer import build_optimizer

    flags = {"model_name": str(tiny_llama_dir), "precision": "fp32", **({"use_peft": True} if peft else {})}
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    gpu = plan_json(capsys, *argv)["gpu"]

    run = parse_cli(flags)
    lm = build_model(run, WeightSource.for_run(run), "fp32", torch.device("cpu"), load_tokenizer(str(tiny_llama_dir)))
    model = CausalLMWithLoss(lm)
    optimizer = build_optimizer(model, run, torch.device("cpu"))
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss_sum.backward()
    optimizer.step()
    params = list(model.parameters())
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert gpu["parameters"] == _tensor_bytes(params)
    assert gpu["gradients"] == _tensor_bytes(p.grad for p in params if p.grad is not None)
    assert gpu["optimizer"] == _tensor_bytes(moments)
    assert (gpu["gradients"] < gpu["parameters"] / 10) == peft


def _shard_bytes(rank: int, world: int) -> dict:
    from shardtune.configs.parse import parse_cli
    from shardtune.models.builder import WeightSource, build_model
    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.planning.estimate import NO_TOKENIZER
    from shardtune.policies.fsdp import shard_model
    from shardtune.utils.distributed import DistInfo

    run = parse_cli({"model_name": os.environ["PLAN_TEST_MODEL"], "enable_fsdp": True, "precision": "fp32"})
    info = DistInfo(rank, rank, world, torch.device("cpu"))
    model = shard_model(CausalLMWithLoss(build_model(run, WeightSource.for_run(run), "fp32", info.device,
                                                     NO_TOKENIZER)), run, info, "fp32")
    return {"parameters": sum(p.to_local().numel() * p.element_size() for p in model.parameters())}


def test_sharded_parameters_are_what_two_real_ranks_hold(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """2 GPUs: the plan's parameter shard is what each of 2 real gloo ranks holds after FSDP2 shards the model
    (up to FSDP's padding of a dimension that does not split evenly)."""
    from test_fsdp_support import run_fn_ranks

    planned = plan_json(capsys, "--gpus", "2", "--enable_fsdp", "--precision", "fp32", "--model_name",
                        str(tiny_llama_dir))["gpu"]["parameters"]
    monkeypatch.setenv("PLAN_TEST_MODEL", str(tiny_llama_dir))
    held = [r["parameters"] for r in run_fn_ranks(_shard_bytes, 2, tmp_path)]
    assert sum(held) == pytest.approx(2 * planned, rel=0.01)
    assert max(held) == pytest.approx(planned, rel=0.02)


def test_checkpointing_is_the_one_a_real_run_chooses(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """With the GPU budget faked as tests/test_activation_budget.py fakes it, a real run checkpoints as many layers
    as the plan for a GPU of that budget says: an ample budget none, a tight one some, an impossible one all."""
    from shardtune.finetuning import main

    flags = {"model_name": str(tiny_llama_dir), "precision": "fp32", "context_length": 128, "torch_compile": False,
             "batch_size_training": 4}
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    fraction = 0.5  # --fsdp_config.ac_memory_fraction's default on this branch; given, so the test holds either way
    argv += ["--fsdp_config.ac_memory_fraction", str(fraction)]
    gpu = plan_json(capsys, *argv)["gpu"]
    tight = (gpu["peak_no_checkpointing"] + gpu["peak_every_layer"]) // 2
    seen = []
    for budget in (10 ** 13, tight, 1):
        plan = plan_json(capsys, *argv, "--gpu_memory_gb", str(budget / fraction / GB))
        monkeypatch.setattr(AB, "device_budget", lambda device, f, b=budget: AB.idle_gpu_budget(int(b / f), f))
        main(output_dir=str(tmp_path / str(budget)), max_train_step=1, save_model=False, num_epochs=1,
             run_validation=False, **{"fsdp_config.ac_memory_fraction": fraction}, **flags)
        ac_line = ac_decision(capsys.readouterr().out)
        assert f" {plan['checkpointed']} of 2 " in ac_line, (plan, ac_line)
        seen.append(plan["checkpointed"])
    assert seen[0] == 0 and seen[2] == 2 and 0 < seen[1] <= 2


def test_json_fields(capsys):
    """The bundled model: every figure is there, in bytes, and adds up."""
    plan = plan_json(capsys)
    gpu = plan["gpu"]
    assert plan["cluster"] == {"gpus": 1, "gpu_memory": int(80 * GB), "nodes": 1}
    assert gpu["peak_reserved"] == gpu["peak"] + gpu["quantization_state"] + gpu["allocator_margin"]
    assert gpu["needed"] == gpu["peak_reserved"] + gpu["cuda_context"] and plan["fits"] is True
    assert gpu["peak_every_layer"] <= gpu["peak"] <= gpu["peak_no_checkpointing"] or plan["checkpointed"]
    for host in (plan["host_low_cpu"], plan["host_without"]):
        assert set(host) == {"rank0", "other_ranks", "first_host", "other_hosts"}
    assert plan["suggestion"] is None and plan["parameters"] > plan["trainable"] * 0.99


def test_llama_70b_on_eight_80gb_gpus(capsys):
    """The seed's 70B command (docs/planning.md): the sharded states alone are 8 bytes per parameter over 8 GPUs,
    so it does not fit; CPU offload is the smallest change; rank 0 reads the bf16 weights, the others none."""
    argv = ["--gpus", "8", "--gpu_memory_gb", "80", "--nodes", "1", "--enable_fsdp", "--low_cpu_fsdp",
            "--fsdp_config.pure_bf16", "--batch_size_training", "1", "--model_name", str(LLAMA_70B)]
    plan = plan_json(capsys, *argv)
    n, gpu = plan["parameters"], plan["gpu"]
    assert 70.5e9 < n < 70.6e9 and plan["precision"] == "bf16_pure"
    assert gpu["parameters"] + gpu["gradients"] + gpu["optimizer"] == pytest.approx(8 * n / 8, rel=1e-6)
    assert plan["fits"] is False and "fsdp_cpu_offload" in plan["suggestion"]["change"]
    low = plan["host_low_cpu"]
    assert low["rank0"] - low["other_ranks"] == 2 * n  # bf16 weights on rank 0 only
    assert low["first_host"] == low["rank0"] + 7 * low["other_ranks"]
    assert plan_cli(argv) == 0 and "smallest change that fits" in capsys.readouterr().out  # the screen


@pytest.mark.parametrize("argv, word", [
    (["--model_name", "/no/such/model"], "folder not found"),
    (["--gpu_memory_gb", "0"], "--gpu_memory_gb"),
    (["--gpus", "3", "--nodes", "2", "--enable_fsdp"], "--nodes"),
    (["--gpus", "6", "--enable_fsdp", "--fsdp_config.sharding_strategy", "HYBRID_SHARD", "--fsdp_config.hsdp",
      "--sharding_group_size", "4", "--replica_group_size", "2"], "sharding_group_size"),
    (["--gpus", "2"], "--enable_fsdp"),
    (["--lrr", "1e-4"], "unknown flag"),
    (["--gpus"], "needs a value"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, word):
    assert plan_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and word in err[-1]


def test_console_command(tiny_llama_dir):
    """``python -m shardtune plan``: the screen on stdout, exit 0; a bad flag exit 2."""
    ok = subprocess.run([sys.executable, "-m", "shardtune", "plan", "--model_name", str(tiny_llama_dir)],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ok.returncode == 0 and "fits: yes" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "shardtune", "plan", "--gpu_memory_gb", "0"], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --gpu_memory_gb")


# benchmarks/README.md session 6, one H200: (harness call, mode) -> the shape and the mode's flags of
# benchmarks/vs_reference.py; the section "Plan vs measured" lists the same plans as commands.
SESSION6_ROWS = {
    ("r1b", "full_ac"): ("llama3.2-1b", ["--fsdp_config.pure_bf16"]),
    ("r1b", "lora"): ("llama3.2-1b", ["--use_peft", "--peft_method", "lora"]),
    ("r3b_full", "full_ac"): ("llama3.2-3b", ["--fsdp_config.pure_bf16"]),
    ("r3b_qlora", "qlora"): ("llama3.2-3b", ["--use_peft", "--peft_method", "lora", "--quantization", "4bit",
                                             "--quantization_config.quant_type", "nf4"]),
    ("r8b_full", "full_ac"): ("llama3.1-8b", ["--fsdp_config.pure_bf16"]),
    ("r8b_lora", "lora"): ("llama3.1-8b", ["--use_peft", "--peft_method", "lora"]),
    ("r8b_lora", "full_ac@frac90"): ("llama3.1-8b", ["--fsdp_config.pure_bf16", "--fsdp_config.ac_memory_fraction",
                                                     "0.9"]),
}


@pytest.fixture(scope="module")
def benchmark_shapes(tmp_path_factory) -> Path:
    """config.json (only) of each model shape the GPU benchmarks built (benchmarks/make_random_model.py)."""
    from transformers import LlamaConfig

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from make_random_model import SHAPES
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    root = tmp_path_factory.mktemp("shapes")
    for name, shape in SHAPES.items():
        LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, dtype="bfloat16").save_pretrained(root / name)
    return root


@pytest.mark.parametrize("row", sorted(SESSION6_ROWS), ids="-".join)
def test_peak_reserved_against_the_gpu_benchmarks(benchmark_shapes, capsys, row):
    """Every GPU row of benchmarks/README.md session 6 (1B, 3B, 8B; full, LoRA, QLoRA; one H200 under torchrun):
    the plan on the same flags and shape makes the run's choice (checkpointed layers, logged estimate) and its
    printed peak reserved is at or above the measured peak reserved and within 10% of it."""
    measured = next(r for r in json.loads(SESSION6.read_text())
                    if r["who"] == "shardtune" and (r["call_stage"], r["mode"]) == row)
    shape, flags = SESSION6_ROWS[row]
    plan = plan_json(capsys, "--gpus", "1", "--gpu_memory_gb", "140", "--enable_fsdp", "--use_fast_kernels",
                     "--batch_size_training", "4", "--context_length", "4096", "--dataset", "alpaca_dataset",
                     "--model_name", str(benchmark_shapes / shape), *flags)
    gpu = plan["gpu"]
    assert f"{plan['checkpointed']}/{plan['layers']}" == measured["ac"]
    assert round(gpu["peak"] / GB, 1) == measured["estimate"]  # the run logged its estimate at one decimal
    assert 1.0 <= gpu["peak_reserved"] / GB / measured["reserved"] <= 1.10


def test_quantized_weights_are_packed_as_bitsandbytes_packs_them(tiny_llama_dir, capsys):
    """QLoRA on paper (planning/quantized.py): every linear of the decoder layers is packed at 4 bits (half a byte a
    weight), the embeddings, norms and output layer stay in bf16, the LoRA adapters train in fp32; the quantization
    state is the QLoRA paper's: 32/64 = 0.5 bits a parameter, 8/64 + 32/(64 * 256) = 0.127 bits with double
    quantization (Dettmers et al. 2023, section 3), plus each layer's code books."""
    from shardtune.configs.parse import parse_cli
    from shardtune.models.builder import WeightSource, build_model
    from shardtune.planning.estimate import NO_TOKENIZER
    from shardtune.planning.quantized import quantization_state_bytes

    base = ["--model_name", str(tiny_llama_dir), "--use_peft", "--peft_method", "lora", "--quantization", "4bit"]
    plain = plan_json(capsys, "--model_name", str(tiny_llama_dir), "--use_peft", "--peft_method", "lora")
    four, double = plan_json(capsys, *base), plan_json(capsys, *base, "--quantization_config.use_double_quant")

    run = parse_cli({"model_name": str(tiny_llama_dir), "use_peft": True, "peft_method": "lora"})
    lm = build_model(run, WeightSource.for_run(run), "bf16_mixed", torch.device("cpu"), NO_TOKENIZER, meta=True)
    output = lm.get_output_embeddings()
    linears = [m.weight for m in lm.modules()
               if type(m) is torch.nn.Linear and m is not output and not m.weight.requires_grad]
    quantized = sum(w.numel() for w in linears)
    assert quantized > 0.2 * plain["parameters"]  # a fifth of the test model (its embeddings hold the rest)
    lora = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    others = plain["parameters"] - lora - quantized
    assert four["parameters"] == plain["parameters"] and four["trainable"] == lora
    assert plain["gpu"]["parameters"] == 2 * (quantized + others) + 4 * lora
    assert four["gpu"]["parameters"] == quantized // 2 + 2 * others + 4 * lora
    code_books = 16 * 4 * len(linears)
    assert four["gpu"]["quantization_state"] - code_books == pytest.approx(quantized * 0.5 / 8, rel=0.01)
    nested_code_books = len(linears) * (256 * 4 + 4)  # double quantization's code book and offset, per layer
    # a byte per 64 weights, and one fp32 absmax per layer for those bytes (a tiny layer has fewer than 256 blocks)
    assert double["gpu"]["quantization_state"] - code_books - nested_code_books == quantized // 64 + 4 * len(linears)
    big = 4096 * 14336  # one Llama-3.1-8B MLP projection: the code books are negligible there
    assert quantization_state_bytes(big, 4096, "4bit", False) * 8 / big == pytest.approx(0.5, rel=0.01)
    assert quantization_state_bytes(big, 4096, "4bit", True) * 8 / big == pytest.approx(0.127, rel=0.01)
    assert quantization_state_bytes(big, 4096, "8bit", False) == 4096 * 4  # one fp32 scale a row
    assert four["gpu"]["gradients"] == plain["gpu"]["gradients"] == 4 * lora


def test_eight_bit_is_planned_on_one_gpu_and_refused_sharded(tiny_llama_dir, capsys):
    """8-bit: int8 weights (one byte each) on one GPU; under FSDP the run refuses it, and so does the plan."""
    argv = ["--model_name", str(tiny_llama_dir), "--use_peft", "--peft_method", "lora", "--quantization", "8bit"]
    four = plan_json(capsys, *argv[:-1], "4bit")
    eight = plan_json(capsys, *argv)
    assert eight["fits"] and eight["gpu"]["parameters"] > four["gpu"]["parameters"]
    assert plan_cli(["--gpus", "2", "--enable_fsdp", *argv]) == 2
    assert "--quantization 8bit" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_runs_log_lines_once(tiny_llama_dir, capsys):
    """The run's own lines that building the model prints (attention, compile) come once, on stderr, even when the
    plan does not fit and the variants suggest.py tries build the model again."""
    assert plan_cli(["--model_name", str(tiny_llama_dir), "--gpu_memory_gb", "0.001", "--torch_compile", "True"]) == 0
    captured = capsys.readouterr()
    assert "fits: NO" in captured.out
    assert captured.err.count("--> attention:") == 1 and captured.err.count("--> torch.compile:") == 1


def test_background_checkpoints_stage_what_a_sharded_checkpoint_stores(benchmark_shapes, capsys):
    """Per rank while training: the trained weights and two AdamW moments in the master dtype (bf16 under
    pure_bf16), sharded; nothing without periodic saves or with --fsdp_config.async_checkpoint False."""
    from shardtune.planning.estimate import Cluster, plan_run

    base = {"model_name": str(benchmark_shapes / "llama3.2-3b"), "enable_fsdp": True, "fsdp_config.pure_bf16": True}
    periodic = {**base, "save_every_n_steps": 100}
    planned = {n: plan_run(kw, Cluster(gpus=n, gpu_memory=139 * 2**30), quiet=True).host_checkpoint_staging
               for n, kw in ((1, periodic), (4, periodic))}
    assert planned[1] == 3 * plan_run(base, Cluster(gpus=1, gpu_memory=139 * 2**30), quiet=True).trainable * 2
    assert planned[4] == planned[1] // 4
    for kw in (base, {**periodic, "fsdp_config.async_checkpoint": False}):
        assert plan_run(kw, Cluster(gpus=1, gpu_memory=139 * 2**30), quiet=True).host_checkpoint_staging == 0
