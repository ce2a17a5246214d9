"""Observability (issue 5): log line, analytic and counted FLOPs, MFU peaks, memory report, profiler trace,
metrics file and its plots, W&B (offline) and TensorBoard. All on CPU with tiny models.

Tolerance of the FLOP comparison: with eager attention the counted FLOPs of a full fine-tuning step equal
the analytic 6N + 12LHQT count exactly once the output layer is charged only at supervised positions (our
loss skips the others); the test allows 1%.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_fsdp_support import log_line

from shardtune.observability.metrics import format_step_line, read_metrics

FLOP_TOLERANCE = 0.01


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _tiny_alpaca(tmp_path: Path, n: int = 40) -> str:
    """The first n records of the bundled Alpaca sample: a couple of optimizer steps per epoch."""
    from shardtune.configs.paths import BUNDLED_ALPACA_SAMPLE

    records = json.loads(Path(BUNDLED_ALPACA_SAMPLE).read_text())[:n]
    path = tmp_path / "alpaca_small.json"
    path.write_text(json.dumps(records))
    return str(path)


def _load_lm(model_dir, attn="eager"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)


def _count_step(model, ids, labels):
    """Counted FLOPs of one forward + backward, with the analytic ModelFlops of the model."""
    from shardtune.observability.flops import count_model_flops, flop_counter_mode

    model_flops = count_model_flops(model)
    with flop_counter_mode() as counter:
        out = model(input_ids=ids, labels=labels)
        out.loss_sum.backward()
    return counter.get_total_flops(), model_flops


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs, peaks, MFU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,geometry,seq,expected_gflops", [
    # peers.md §5.3 (torchtitan formula, non-causal): Llama 3.1 8B and 3.2 1B (tied embeddings)
    ("llama-3.1-8b", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), 2048, 48.3),
    ("llama-3.1-8b", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), 8192, 57.9),
    ("llama-3.2-1b", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True), 2048, 8.22),
])
def test_analytic_flops_match_published_llama3_numbers(name, geometry, seq, expected_gflops):
    """Built on the meta device (no memory): 6N + 12LHQT per token, N = linear weights incl. the output layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.observability.flops import count_model_flops

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**geometry))
    mf = count_model_flops(model)
    assert mf.frozen_matrix_params == 0 and mf.num_heads == geometry["num_attention_heads"]
    assert mf.per_token(seq) / 1e9 == pytest.approx(expected_gflops, rel=0.005)


def test_peak_table_and_mfu():
    from shardtune.observability.mfu import lookup_peak_tflops, peak_tflops_for

    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert lookup_peak_tflops("NVIDIA H100 PCIe") == 756
    assert lookup_peak_tflops("NVIDIA H100 NVL") == 835
    assert lookup_peak_tflops("NVIDIA H200") == 989
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert lookup_peak_tflops("NVIDIA L40S") == 362
    assert lookup_peak_tflops("NVIDIA A10G") == 125
    assert lookup_peak_tflops("Some Future GPU") is None
    peak, note = peak_tflops_for(torch.device("cpu"))
    assert peak is None and "without MFU" in note
    assert peak_tflops_for(torch.device("cpu"), 2.5)[0] == 2.5  # --peak_tflops overrides


# ---------------------------------------------------------------------------------------------
# Counted FLOPs
# ---------------------------------------------------------------------------------------------
def test_flop_counter_matches_analytic_formula_eager_gqa(tiny_llama_dir):
    """Full fine-tuning, eager attention, GQA tiny Llama: counted == analytic within FLOP_TOLERANCE."""
    from shardtune.models.loss import CausalLMWithLoss

    model = CausalLMWithLoss(_load_lm(tiny_llama_dir, "eager"))
    ids = torch.randint(3, 200, (2, 64))
    measured, mf = _count_step(model, ids, ids.clone())
    assert mf.num_heads == 4 and mf.head_params > 0 and mf.frozen_matrix_params == 0
    analytic = mf.batch(ids.shape)
    supervised = 2 * 63  # labels[:, 1:]: the loss applies the output layer there only
    expected = analytic - mf.head_flops_per_token() * (ids.numel() - supervised)
    assert measured == pytest.approx(expected, rel=FLOP_TOLERANCE)
    assert measured / analytic == pytest.approx(1.0, abs=0.05)


def test_flop_counter_counts_gqa_sdpa_attention(tiny_llama_dir):
    """SDPA with grouped-query k/v (enable_gqa) on PyTorch's CPU kernel: counted, never a shape assertion.
    Fused kernels recompute QK^T in the backward, so attention counts 14 where the analytic count has 12."""
    import torch.nn.functional as F

    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.observability.flops import flop_counter_mode, sdpa_flop_formulas

    b, hq, hkv, s, d = 2, 8, 2, 16, 32
    q = torch.randn(b, hq, s, d, requires_grad=True)
    k = torch.randn(b, hkv, s, d, requires_grad=True)
    v = torch.randn(b, hkv, s, d, requires_grad=True)
    with flop_counter_mode() as counter:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert counter.get_total_flops() == 4 * b * hq * s * s * d
    with flop_counter_mode() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 10 * b * hq * s * s * d
    # the CUDA kernels' formulas take GQA shapes too (PyTorch < 2.10 asserted on them)
    cuda_flash = torch.ops.aten._scaled_dot_product_flash_attention
    assert sdpa_flop_formulas()[cuda_flash]((b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d)) == 4 * b * hq * s * s * d

    model = CausalLMWithLoss(_load_lm(tiny_llama_dir, "sdpa"))
    ids = torch.randint(3, 200, (2, 64))
    measured, mf = _count_step(model, ids, ids.clone())
    expected = mf.batch(ids.shape) - mf.head_flops_per_token() * 2
    attention = 12 * mf.num_layers * mf.num_heads * mf.head_dim * 64 * ids.numel()
    assert measured == pytest.approx(expected + attention * 2 / 12, rel=FLOP_TOLERANCE)


def test_lora_counts_frozen_weights_at_4n(tiny_llama_dir):
    """LoRA: base weights frozen (4N), adapters trainable (6N). The count is a little lower still: layer 0's
    frozen projections also skip the input gradient (their input, the frozen embedding, needs none)."""
    from peft import LoraConfig, get_peft_model

    from shardtune.models.loss import CausalLMWithLoss

    lm = _load_lm(tiny_llama_dir, "eager")
    full = sum(m.in_features * m.out_features for m in lm.modules() if isinstance(m, torch.nn.Linear))
    model = CausalLMWithLoss(get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    ids = torch.randint(3, 200, (2, 64))
    measured, mf = _count_step(model, ids, ids.clone())
    assert mf.frozen_matrix_params == full and 0 < mf.trainable_matrix_params < full // 10
    assert not mf.head_trainable
    expected = mf.batch(ids.shape) - mf.head_flops_per_token() * 2
    assert 0.85 * expected < measured < expected


def test_flop_counter_observer_windows_and_fallback(capsys):
    """The window holds exactly the step after `start` steps; with no step after it, the counted step's own
    time is used and the report says so; a run too short to count warns."""
    from types import SimpleNamespace

    from shardtune.observability.flops import FlopCounter

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    counter = FlopCounter(start=1, device=torch.device("cpu"), peak_tflops=None)
    for step in range(3):  # steps 1, 2 and 3; step 2 is counted, step 3 timed
        counter.on_step_start(SimpleNamespace(step=step))
        a @ b
        counter.on_step_end(SimpleNamespace(step=step + 1), {"step": step + 1, "model_flops": 2 * 64 * 32 * 16})
    assert counter.result["step"] == 2 and counter.result["timed_step"] == 3
    assert counter.result["measured_flops"] == 2 * 64 * 32 * 16 and counter.result["ratio"] == 1.0

    short = FlopCounter(start=0, device=torch.device("cpu"))
    short.on_step_start(SimpleNamespace(step=0))
    a @ b
    short.on_step_end(SimpleNamespace(step=1), {"step": 1})
    short.close()
    assert short.result["timed_step"] is None
    never = FlopCounter(start=5, device=torch.device("cpu"))
    never.close()
    (warning,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: ")]
    assert never.result is None and "--flop_counter" in warning, warning


# ---------------------------------------------------------------------------------------------
# Log line and memory report
# ---------------------------------------------------------------------------------------------
def test_step_line_format():
    rec = dict(step=20, epoch=0, loss=2.34159, perplexity=10.397, lr=1e-4, grad_norm=0.8741, tokens_per_s=12345.0,
               tflops=402.1, mfu=0.4066, peak_mem_gb=23.4)
    line = format_step_line(rec, num_epochs=3)
    assert line == ("step 20 | epoch 1/3 | loss 2.3416 | ppl 10.40 | lr 1.00e-04 | grad_norm 0.874 | "
                    "tok/s/gpu 12.3k (incl. padding) | TFLOP/s/gpu 402 | MFU 40.7% | peak_mem 23.4 GB")
    assert format_step_line({**rec, "peak_reserved_gb": 25.04}).endswith("| peak_mem 23.4 GB (reserved 25.0)")
    assert "MFU" not in format_step_line({**rec, "mfu": None})  # CPU: TFLOP/s only


def test_memory_report_without_thread():
    import threading

    from shardtune.observability.memory import MemoryTracker

    threads = threading.active_count()
    tracker = MemoryTracker(torch.device("cpu"))
    tracker.start_epoch()
    block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB touched
    stats = tracker.epoch_stats()
    del block
    assert threading.active_count() == threads
    assert stats.host_peak_rss > 64 * 2 ** 20 and stats.device_peak_allocated is None
    line = stats.format("epoch 1")
    assert line.startswith("--> memory (epoch 1): host peak RSS ") and line.endswith(" GB")
    assert stats.as_gb()["host_peak_rss_gb"] == round(stats.host_peak_rss / 2 ** 30, 1)
    assert tracker.run_stats().host_peak_rss >= stats.host_peak_rss


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def metrics_run(tiny_llama_dir, tmp_path_factory):
    """One 2-epoch run with the log line every 2 steps, --save_metrics, --peak_tflops, the FLOP counter and
    TensorBoard; the tests below read its outputs."""
    import io
    from contextlib import redirect_stdout

    from shardtune.finetuning import main

    tmp = tmp_path_factory.mktemp("obs_run")
    buf = io.StringIO()
    with redirect_stdout(buf):
        summary = main(model_name=str(tiny_llama_dir), dataset="alpaca_dataset", data_path=_tiny_alpaca(tmp),
                       context_length=128, batch_size_training=2, num_epochs=2, lr=1e-3, log_every_n_steps=2,
                       save_metrics=True, peak_tflops=0.5, flop_counter=True, flop_counter_start=2,
                       use_tensorboard=True, output_dir=str(tmp / "out"), save_model=False)
    return {"summary": summary, "stdout": buf.getvalue(), "out": tmp / "out"}


def test_log_line_every_n_steps(metrics_run):
    lines = [ln for ln in metrics_run["stdout"].splitlines() if ln.startswith("step ")]
    steps = [int(ln.split()[1]) for ln in lines]
    assert steps and all(s % 2 == 0 for s in steps)
    assert len(steps) == metrics_run["summary"]["steps"] // 2
    for field in ("epoch ", "loss ", "lr ", "grad_norm ", "tok/s/gpu ", "TFLOP/s/gpu ", "MFU ", "peak_mem "):
        assert all(f"| {field}" in ln for ln in lines), field


def test_flop_counter_run_reports(metrics_run):
    out = metrics_run["stdout"]
    assert "step 3" in log_line(out, "--> FLOP counter") and "MFU" in log_line(out, "--> FLOP counter")
    fc = metrics_run["summary"]["flop_counter"]
    assert fc["step"] == 3 and fc["timed_step"] == 4 and fc["measured_flops"] > 0
    assert fc["mfu"] == pytest.approx(fc["tflops_per_gpu"] / 0.5)
    # SDPA on CPU, packed alpaca: counted within 10% of the analytic count charged at supervised positions
    assert fc["measured_flops"] / fc["expected_flops"] == pytest.approx(1.0, abs=0.1)


def test_metrics_file_records(metrics_run):
    records = read_metrics(metrics_run["summary"]["metrics_file"])
    steps = [r for r in records if r["kind"] == "train_step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == metrics_run["summary"]["steps"] and len(epochs) == 2
    for key in ("loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "peak_mem_gb"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert {r["input_tokens"] for r in steps} == {2 * 128}  # packed: batch x context
    # Launch to the first step, in the first step's record and the log (the process's age at that step).
    assert 0 < steps[0]["since_launch_s"] < 3600 and all("since_launch_s" not in r for r in steps[1:])
    assert f"{steps[0]['since_launch_s']:.0f} s" in log_line(metrics_run["stdout"], "--> first step")
    for key in ("train_loss", "train_perplexity", "eval_loss", "eval_perplexity", "step", "host_peak_rss_gb"):
        assert all(key in r for r in epochs), key
    assert epochs[-1]["step"] == steps[-1]["step"]


def test_plot_metrics_writes_pngs(metrics_run, tmp_path):
    from shardtune.observability.plots import main as plot_main

    assert plot_main([metrics_run["summary"]["metrics_file"], "--out_dir", str(tmp_path)]) == 0
    names = sorted(p.name.split("_", 2)[-1] for p in tmp_path.glob("*.png"))
    assert names == ["loss_by_epoch.png", "loss_by_step.png", "lr_by_step.png", "memory_by_step.png",
                     "perplexity_by_epoch.png", "perplexity_by_step.png", "throughput_by_step.png"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_plot_metrics_without_matplotlib(metrics_run, monkeypatch):
    import sys

    from shardtune.observability.plots import MatplotlibMissing, plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MatplotlibMissing, match=r"pip install 'shardtune\[tracking\]'"):
        plot(metrics_run["summary"]["metrics_file"])


def test_tensorboard_events_read_back(metrics_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (metrics_run["out"] / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "epoch/train_loss",
            "eval/loss", "eval/perplexity"} <= tags
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, metrics_run["summary"]["steps"] + 1))
    assert len(acc.Scalars("eval/loss")) == 2


def test_profiler_trace_and_wandb_offline(tiny_llama_dir, tmp_path, monkeypatch):
    """--use_profiler writes one JSON trace for rank 0 that parses; --use_wandb in offline mode writes a run."""
    pytest.importorskip("wandb")
    from shardtune.finetuning import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    prof_dir = tmp_path / "prof"
    summary = main(**{"model_name": str(tiny_llama_dir), "context_length": 128, "batch_size_training": 2,
                      "max_train_step": 3, "num_epochs": 1, "max_eval_step": 1, "use_profiler": True,
                      "profiler_dir": str(prof_dir), "profiler_wait": 0, "profiler_warmup": 1, "profiler_active": 2,
                      "use_wandb": True, "output_dir": str(tmp_path / "out"),
                      "save_model": False})
    assert summary["steps"] == 3
    (trace,) = prof_dir.glob("rank0.*.pt.trace.json")
    data = json.loads(trace.read_text())
    names = {e.get("name", "") for e in data["traceEvents"]}
    assert any(n.startswith("ProfilerStep#") for n in names) and any("aten::mm" in n for n in names)

    # offline W&B: the run's records (protobuf, no Python reader in wandb >= 0.20) hold the logged keys,
    # the project and the resolved config
    (run_dir,) = (tmp_path / "wandb_root" / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    data = run_file.read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/tokens_per_s", b"epoch/train_loss", b"eval/loss",
                b"shardtune", b"train_config", b"context_length"):
        assert key in data, key


def test_missing_tracking_extra_fails_before_model_load(monkeypatch, tmp_path):
    import importlib.util

    from shardtune.errors import ConfigError
    from shardtune.finetuning import main
    from shardtune.observability import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    for flag in ("use_wandb", "use_tensorboard"):
        # a model path that does not exist: the tracker check must fire first
        with pytest.raises(ConfigError, match=rf"--{flag} needs .*pip install 'shardtune\[tracking\]'"):
            main(model_name=str(tmp_path / "no-such-model"), output_dir=str(tmp_path / "o"), **{flag: True})


# ---------------------------------------------------------------------------------------------
# Two ranks (FSDP2 over gloo, forked in-process: tests/test_fsdp_support.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_profiler_traces_and_rank0_log(tiny_llama_dir, tmp_path):
    """One trace per rank; the log line and the metrics file on rank 0 only; throughput per GPU."""
    from test_fsdp_support import base_kwargs, run_ranks

    prof = tmp_path / "prof"
    results = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "out", use_profiler=True, profiler_dir=str(prof),
                                       profiler_wait=0, profiler_warmup=1, profiler_active=1), tmp_path / "res")
    for rank in (0, 1):
        (trace,) = prof.glob(f"rank{rank}.*.pt.trace.json")
        assert json.loads(trace.read_text())["traceEvents"]
    rank0, rank1 = results[0]["log"], results[1]["log"]
    assert [ln.split(" |")[0] for ln in rank0.splitlines() if ln.startswith("step ")] == ["step 1", "step 2", "step 3"]
    assert not [ln for ln in rank1.splitlines() if ln.startswith("step ")]
    (metrics,) = (tmp_path / "out").glob("metrics_*.jsonl")
    steps = [r for r in read_metrics(metrics) if r["kind"] == "train_step"]
    # input tokens are summed over ranks; tokens/s is per GPU: input tokens / world / step time
    assert all(r["input_tokens"] == 2 * 2 * 128 for r in steps)
    assert all(r["tokens_per_s"] == pytest.approx(r["input_tokens"] / 2 / r["step_time_s"]) for r in steps)


@pytest.mark.slow
def test_two_ranks_flop_counter_on_sharded_model(tiny_llama_dir, tmp_path):
    """FSDP2-sharded model: the analytic count sees whole layers, the counter's all-reduce agrees on all ranks."""
    from test_fsdp_support import base_kwargs, run_ranks

    results = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "out", max_train_step=4, flop_counter=True,
                                       flop_counter_start=1, peak_tflops=1.0), tmp_path / "res")
    fc = [r["summary"]["flop_counter"] for r in results]
    assert fc[0]["measured_flops"] == fc[1]["measured_flops"] > 0 and fc[0]["step"] == 2 and fc[0]["timed_step"] == 3
    # per GPU: the analytic count of one rank's batch (2 x 128 tokens); SDPA recompute and the output layer at
    # supervised positions only keep measured within 10% of it
    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.observability.flops import count_model_flops

    single = count_model_flops(CausalLMWithLoss(_load_lm(tiny_llama_dir, "sdpa")))
    assert fc[0]["analytic_flops"] == pytest.approx(single.batch((2, 128)))
    assert fc[0]["measured_flops"] / fc[0]["expected_flops"] == pytest.approx(1.0, abs=0.1)
    assert "--> FLOP counter: step 2" in results[0]["log"] and "FLOP counter" not in results[1]["log"]


def test_epoch_peaks_leave_the_kernels_high_water_mark_alone():
    """The per-epoch host peak is measured without /proc/self/clear_refs: the process' high-water mark (which
    the run reports) survives every epoch; an epoch below it reports its own, smaller, sampled peak."""
    from shardtune.observability.memory import MemoryTracker, host_peak_rss_bytes, host_rss_bytes

    tracker = MemoryTracker(torch.device("cpu"))
    tracker.start_epoch()
    block = torch.ones(256 * 2 ** 20 // 4)  # 256 MiB touched: a new high-water mark
    first = tracker.epoch_stats().host_peak_rss
    hwm = host_peak_rss_bytes()
    assert first == hwm
    del block  # a large block goes back to the kernel: the resident set falls, the high-water mark stays
    if host_rss_bytes() > hwm - 128 * 2 ** 20:
        pytest.skip("the allocator kept the freed block resident")
    tracker.start_epoch()
    tracker.sample()
    second = tracker.epoch_stats().host_peak_rss
    slack = 4 * 2 ** 20  # the kernel updates its RSS counters lazily (per-thread batches)
    assert host_peak_rss_bytes() >= hwm - slack  # not reset
    assert second < hwm - 128 * 2 ** 20 and second >= host_rss_bytes() - 16 * 2 ** 20
    assert tracker.run_stats().host_peak_rss >= hwm - slack
