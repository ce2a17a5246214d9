"""Wall time by phase (observability/phases.py), evaluation under torch.compile without recompilation, and the
second run of a command reading its tokenised data from the cache."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardtune.configs.parse import parse_cli
from shardtune.data.loader import build_dataloader
from shardtune.datasets import DATASET_PREPROC, Builder, get_preprocessed_dataset
from shardtune.finetuning import main
from shardtune.models.loading import load_tokenizer
from shardtune.models.loss import CausalLMWithLoss
from shardtune.observability.phases import PhaseTimer
from shardtune.policies.compile import compile_decoder_layers
from shardtune.training.context import Telemetry, TrainContext
from shardtune.training.evaluate import evaluate
from shardtune.training.state import TrainState

QUICK = dict(context_length=64, num_epochs=1, precision="fp32", torch_compile=False)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nested_phases_are_counted_once_and_the_rest_is_other():
    clock = FakeClock()
    phases = PhaseTimer(origin=90.0, clock=clock)  # launched 10 s ago
    with phases.time("data"):
        clock.now += 3
    with phases.time("model"):
        clock.now += 5
    clock.now += 2                       # startup's rest (checks, process group)
    phases.end_startup()                 # startup: 10 + 3 + 5 + 2 = 20
    with phases.time("first_step"):
        phases._compile_start()
        clock.now += 7                   # compiling, inside the first step
        phases._compile_end()
        clock.now += 1
    with phases.time("training"):
        clock.now += 4
        with phases.time("checkpoints"):
            clock.now += 6               # charged to checkpoints, not to training
            with phases.time("export"):
                clock.now += 2
            clock.now += 1
        clock.now += 1
    clock.now += 0.5                     # outside every phase
    s = phases.summary()
    assert s["total"] == 42.5
    assert s["startup"] == 20 and s["startup_parts"] == {"data": 3, "model": 5}
    assert (s["first_step"], s["training"], s["checkpoints"], s["export"], s["evaluation"]) == (8, 5, 7, 2, 0)
    assert s["other"] == 0.5
    top = ("startup", "first_step", "training", "evaluation", "checkpoints", "export", "other")
    assert sum(s[k] for k in top) == s["total"]
    assert s["compile"] == {"first_step": 7} and s["compiles"] == {"first_step": 1}
    line = phases.format_line(s)
    assert line.startswith("--> wall time 42 s: startup 20 s (data 3.0 s, model 5.0 s)")
    assert "first step 8.0 s (compile 7.0 s)" in line and "checkpoints 7.0 s" in line


def _eval_setup(tiny_llama_dir, tmp_path, **flags):
    run = parse_cli(dict(model_name=str(tiny_llama_dir), output_dir=str(tmp_path), run_validation=True,
                         val_batch_size=3, **{**QUICK, **flags}))
    tok = load_tokenizer(str(tiny_llama_dir))
    samples = get_preprocessed_dataset(tok, run.dataset, "val", run.train)
    loader = build_dataloader(samples, tok, run.train, train=False)
    sizes = [len(b) for b in loader.batch_sampler]
    assert len(set(sizes)) == 2, sizes  # the last batch is partial: the case that used to recompile
    return run, loader


def _token_weighted_eager_loss(model, loader) -> float:
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            loss_sum, tokens = loss_sum + out.loss_sum.double().item(), tokens + out.num_tokens.item()
    return loss_sum / tokens


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["packing", "padding"])
def test_second_evaluation_compiles_nothing_and_keeps_the_eager_loss(batching, tiny_llama_dir, tmp_path,
                                                                     monkeypatch):
    """Compiled decoder layers: the first evaluation (of the full batches) compiles its no_grad graph(s), a training
    step in between compiles its own, and the second evaluation, of every batch, reuses the first's: no compilation
    at all (counted by torch.compile's own callbacks), the partial last batch included (it is topped up to the full
    batch's shape). Its loss is the uncompiled model's token-weighted loss over every sample (the filler rows add
    nothing)."""
    run, loader = _eval_setup(tiny_llama_dir, tmp_path, batching_strategy=batching)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold, and not the user's cache
    torch._dynamo.reset()
    eager = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    expected = _token_weighted_eager_loss(eager, loader)
    model = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    compile_decoder_layers(model)
    phases = PhaseTimer()
    ctx = TrainContext(run=run, device=torch.device("cpu"), telemetry=Telemetry(phases=phases))
    with phases.watching_compiles():
        run.train.max_eval_step = len(loader) - 1  # the full batches only
        with phases.time("evaluation"):
            evaluate(model, loader, ctx, TrainState())
        with phases.time("training"):
            model(**next(iter(loader))).loss_sum.backward()
        compiles_before = dict(phases.compiles)
        run.train.max_eval_step = 0  # every batch, the partial last one too
        with phases.time("evaluation"):
            loss = evaluate(model, loader, ctx, TrainState())
    assert compiles_before["evaluation"] >= 1 and compiles_before["training"] >= 1  # compile was really on
    assert phases.compiles == compiles_before  # the second evaluation compiled nothing
    assert loss == pytest.approx(expected, abs=1e-5)


def test_summary_has_the_phases_and_a_second_run_reads_the_tokenised_cache(tiny_llama_dir, tmp_path, capsys,
                                                                           monkeypatch):
    flags = dict(model_name=str(tiny_llama_dir), output_dir=str(tmp_path), max_train_step=2, run_validation=True,
                 max_eval_step=2, save_model=True, **QUICK)
    summary = main(**flags)
    phases = json.loads((tmp_path / "summary.json").read_text())["phases_s"]
    assert phases == summary["phases_s"]
    top = ("startup", "first_step", "training", "evaluation", "checkpoints", "export", "other")
    assert sum(phases[k] for k in top) == pytest.approx(phases["total"], abs=0.05)  # rounded to 0.01 s each
    assert all(phases[k] > 0 for k in ("startup", "first_step", "training", "evaluation", "checkpoints", "export"))
    assert phases["startup_parts"]["data"] > 0 and phases["startup_parts"]["model"] > 0
    assert phases["compile"] == {}  # --torch_compile False: nothing compiled
    first_log = capsys.readouterr().out
    assert "--> wall time" in first_log and "tokenised" in first_log
    cache_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "data_cache").glob("*.arrow")}
    assert len(cache_files) == 2  # train and val

    def no_tokenizing(*_):
        raise AssertionError("the second run tokenised again")

    for name, builder in list(DATASET_PREPROC.items()):
        monkeypatch.setitem(DATASET_PREPROC, name, Builder(builder.load_examples, no_tokenizing))
    again = main(**flags, overwrite_output_dir=True)
    assert "reusing the tokenised cache" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data_cache").glob("*.arrow")} == cache_files
    assert again["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-6)
