"""What a run saves is what it trained: every PEFT method and full fine-tuning, in one process and on 2 gloo
ranks under FSDP, with activation checkpointing on and off, with sharded and full checkpoints, exports a
folder that plain ``PeftModel.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` loads to the
trained model's logits. The trained model's logits come independently from the sharded checkpoint (read
with torch.distributed.checkpoint into a fresh model, no shardtune export code involved).

Also here: the save guards themselves, on real files.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import HANG_TIMEOUT_S
from test_fsdp_support import ac_decision, base_kwargs, first_trained_step, log_line, run_ranks

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 64, 12, 250]])
CONFIGS = list(itertools.product([1, 2], [True, False], ["SHARDED_STATE_DICT", "FULL_STATE_DICT"]))


def _config_id(world, ac, ckpt):
    return f"{world}rank-{'ac' if ac else 'noac'}-{ckpt.split('_')[0].lower()}"


def _train(model_dir, out, world, ac, ckpt, **flags):
    kwargs = base_kwargs(model_dir, out, enable_fsdp=world > 1, batch_size_training=4 // world, save_model=True,
                         save_every_n_steps=3, lr=1e-2, **flags,
                         **{"fsdp_config.fsdp_activation_checkpointing": ac, "fsdp_config.checkpoint_type": ckpt})
    return run_ranks(world, kwargs, out.parent / f"{out.name}-ranks")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _logits_from_sharded_checkpoint(model_dir, out, method=None) -> torch.Tensor:
    """The trained weights, read straight from the DCP checkpoint into a freshly built model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from shardtune.configs.parse import parse_cli
    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.models.peft import apply_peft

    ckpt = out / "checkpoints" / "fine-tuned" / "step_000003"
    lm = _base(model_dir)
    if method:
        no_dropout = {"lora_dropout": 0.0} if method == "lora" else {}  # the only method with dropout
        lm = apply_peft(lm, parse_cli({"model_name": str(model_dir), "use_peft": True, "peft_method": method,
                                       **no_dropout}))
    model = CausalLMWithLoss(lm)
    stored = {k[len("model."):] for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
              if k.startswith("model.")}
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in stored}}
    assert set(state["model"]) == stored
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    return _logits(lm)


@pytest.mark.parametrize("method", ["lora", "llama_adapter", "prefix"])
def test_every_adapter_saved_is_the_trained_one(method, tiny_llama_dir, tmp_path):
    from peft import PeftModel

    flags = dict(use_peft=True, peft_method=method, **({"lora_dropout": 0.0} if method == "lora" else {}))
    exported = {}
    for world, ac, ckpt in CONFIGS:
        name = _config_id(world, ac, ckpt)
        results = _train(tiny_llama_dir, tmp_path / name, world, ac, ckpt, **flags)
        ac_line = ac_decision(results[0]["log"])
        assert ("2 of 2" in ac_line) if ac else ac_line == "off", (name, ac_line)
        exported[name] = _logits(PeftModel.from_pretrained(_base(tiny_llama_dir), tmp_path / name / "model"))
        if ckpt == "FULL_STATE_DICT":  # the checkpoint's own adapter folder loads the same way
            inner = tmp_path / name / "checkpoints" / "fine-tuned" / "step_000003" / "model"
            torch.testing.assert_close(_logits(PeftModel.from_pretrained(_base(tiny_llama_dir), inner)),
                                       exported[name], atol=1e-6, rtol=0)
    base = _logits(_base(tiny_llama_dir))
    for world in (1, 2):
        trained = _logits_from_sharded_checkpoint(tiny_llama_dir, tmp_path / _config_id(world, True,
                                                                                       "SHARDED_STATE_DICT"), method)
        assert not torch.allclose(trained, base, atol=1e-3), "training changed nothing"
        for (w, ac, ckpt) in CONFIGS:
            if w == world:
                torch.testing.assert_close(exported[_config_id(w, ac, ckpt)], trained, atol=1e-5, rtol=0,
                                           msg=_config_id(w, ac, ckpt))


def test_every_full_model_saved_is_the_trained_one(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    exported = {}
    for world, ac, ckpt in CONFIGS:
        name = _config_id(world, ac, ckpt)
        _train(tiny_llama_dir, tmp_path / name, world, ac, ckpt)
        folder = tmp_path / name / "model"
        exported[name] = _logits(AutoModelForCausalLM.from_pretrained(folder))
        config, base_config = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(tiny_llama_dir)
        mine, theirs = (c.to_diff_dict() for c in (config, base_config))
        assert config.use_cache is True and {k: v for k, v in mine.items() if k != "_name_or_path"} == \
            {k: v for k, v in theirs.items() if k != "_name_or_path"}  # the model's own config.json
    base = _logits(_base(tiny_llama_dir))
    for world in (1, 2):
        trained = _logits_from_sharded_checkpoint(tiny_llama_dir, tmp_path / _config_id(world, True,
                                                                                       "SHARDED_STATE_DICT"))
        assert not torch.allclose(trained, base, atol=1e-3)
        for (w, ac, ckpt) in CONFIGS:
            if w == world:
                torch.testing.assert_close(exported[_config_id(w, ac, ckpt)], trained, atol=1e-5, rtol=0,
                                           msg=_config_id(w, ac, ckpt))


# ---------------------------------------------------------------------------------------------
# The guards in the save path
# ---------------------------------------------------------------------------------------------
def _lora(model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_base(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_adapter_export_refuses_an_incomplete_adapter_and_keeps_the_previous_one(tiny_llama_dir, tmp_path):
    from shardtune.errors import SaveError
    from shardtune.model_checkpointing.export import export_adapter

    peft_model = _lora(tiny_llama_dir)
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    out = tmp_path / "model"
    export_adapter(peft_model, trainable, out)
    before = (out / "adapter_model.safetensors").read_bytes()
    # a trained tensor that the adapter format would not hold (e.g. a wrapper hiding it from peft)
    with pytest.raises(SaveError, match=r"holds 8 tensors but 9 were trained .* NOT saved"):
        export_adapter(peft_model, {**trainable, "model.extra.weight": torch.ones(2)}, out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_adapter_export_sees_through_module_wrappers(tiny_llama_dir, tmp_path):
    """Activation-checkpoint wrappers rename modules (not state-dict keys); peft selected nothing under them."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from shardtune.model_checkpointing.export import canonical_name, export_adapter
    from shardtune.models.loading import decoder_layers
    from shardtune.policies.activation_checkpointing import apply_activation_checkpointing

    peft_model = _lora(tiny_llama_dir)
    expected = _logits(peft_model)
    apply_activation_checkpointing(peft_model, decoder_layers(peft_model))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("_checkpoint_wrapped_module" in n for n in names)
    export_adapter(peft_model, {canonical_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad},
                   tmp_path / "model")
    assert len(load_file(tmp_path / "model" / "adapter_model.safetensors")) == len(names) == 8
    reloaded = PeftModel.from_pretrained(_base(tiny_llama_dir), tmp_path / "model")
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-6, rtol=0)


def test_model_folder_check_names_missing_tensors(tiny_llama_dir, tmp_path):
    from shardtune.errors import SaveError
    from shardtune.model_checkpointing.export import check_model_folder

    sd = _base(tiny_llama_dir).state_dict()
    check_model_folder(tiny_llama_dir, sd)  # the real folder holds everything
    with pytest.raises(SaveError, match=r"missing: model.extra.weight"):
        check_model_folder(tiny_llama_dir, {**sd, "model.extra.weight": torch.ones(3)})
    with pytest.raises(SaveError, match=r"wrong shape: model.norm.weight"):
        check_model_folder(tiny_llama_dir, {**sd, "model.norm.weight": torch.ones(3)})


def test_replace_directory_swaps_without_a_gap(tmp_path):
    from shardtune.utils.io import _exchange, replace_directory

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a").write_text("old")
    replace_directory(tmp_path / "new", tmp_path / "model")
    assert (tmp_path / "model" / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]
    (tmp_path / "x").mkdir()
    assert _exchange(tmp_path / "x", tmp_path / "model")  # Linux: one atomic swap, never a missing folder
    assert (tmp_path / "x" / "a").read_text() == "new"


# ---------------------------------------------------------------------------------------------
# One run per output folder
# ---------------------------------------------------------------------------------------------
def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(  # another live run holding the folder
        [sys.executable, "-c", "import sys; from shardtune.model_checkpointing.output_dir import lock_output_dir; "
         f"lock_output_dir({str(out)!r}); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        results = run_ranks(2, base_kwargs(tiny_llama_dir, out), tmp_path / "r1", expect_error=True)
        for r in results:
            assert "--output_dir" in r["error"] and str(out) in r["error"] and "in use" in r["error"], r["error"]
    finally:
        holder.kill()  # SIGKILL: the run dies without releasing anything
        holder.wait()
    run_ranks(2, base_kwargs(tiny_llama_dir, out), tmp_path / "r2")  # its lock died with it
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the lock is no file


def test_a_new_run_never_mixes_with_an_earlier_runs_results(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    flags = dict(save_model=True, save_every_n_steps=1, keep_last_n_checkpoints=2)
    run_ranks(2, base_kwargs(tiny_llama_dir, out, **flags), tmp_path / "r1")
    first_id = json.loads((out / "run.json").read_text())["run_id"]
    results = run_ranks(2, base_kwargs(tiny_llama_dir, out, **flags), tmp_path / "r2", expect_error=True)
    assert all("earlier run" in r["error"] and "--overwrite_output_dir" in r["error"] for r in results)
    run_ranks(2, base_kwargs(tiny_llama_dir, out, overwrite_output_dir=True, max_train_step=2, **flags), tmp_path / "r3")
    root = out / "checkpoints" / "fine-tuned"
    states = [json.loads((p / "state.json").read_text()) for p in sorted(root.iterdir())]
    assert [s["train_state"]["step"] for s in states] == [1, 2]  # the old step 3 is gone, not resumed from
    assert len({s["run_id"] for s in states}) == 1 and states[0]["run_id"] != first_id


def test_auto_only_resumes_the_runs_own_checkpoints(tiny_llama_dir, tmp_path):
    """Two runs share --dist_checkpoint_root_folder; each resumes its own."""
    shared = tmp_path / "shared_ckpts"
    a = base_kwargs(tiny_llama_dir, tmp_path / "A", dist_checkpoint_root_folder=str(shared), save_every_n_steps=1,
                    keep_last_n_checkpoints=5, max_train_step=2)
    run_ranks(2, a, tmp_path / "ra")
    b = {**a, "output_dir": str(tmp_path / "B"), "max_train_step": 3}
    refused = run_ranks(2, b, tmp_path / "rb", expect_error=True)  # the same checkpoint folder: names would clash
    assert "earlier run" in refused[0]["error"] and "--overwrite_output_dir" in refused[0]["error"]
    b["dist_checkpoint_folder"] = "other"
    run_ranks(2, b, tmp_path / "rb2")  # B's own folder under the shared root
    import shutil

    shutil.copytree(shared / "other" / "step_000003", shared / "fine-tuned" / "step_000003")  # B's, newer than A's
    results = run_ranks(2, {**a, "max_train_step": 4, "resume_from": "auto"}, tmp_path / "ra2")
    assert "1 checkpoint" in log_line(results[0]["log"], "ignoring")  # B's step 3, of another run
    assert first_trained_step(tmp_path / "A") == 3  # A's own step 2 resumed


# ---------------------------------------------------------------------------------------------
# A diverged run is never a success
# ---------------------------------------------------------------------------------------------
def test_divergence_stops_the_run_without_saving(tiny_llama_dir, tmp_path):
    results = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "out", lr=1e30, max_train_step=6, save_model=True,
                                       save_every_n_steps=1), tmp_path / "r", expect_error=True)
    for r in results:
        assert r["error"].startswith("TrainingDiverged") and "not finite" in r["error"]
    assert not (tmp_path / "out" / "model").exists()
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open  # noqa: F401 - every checkpoint written is finite

    for ckpt in (tmp_path / "out" / "checkpoints" / "fine-tuned").glob("step_*"):
        md = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        state = {k: torch.empty(v.size) for k, v in md.items() if k.startswith("model.") and hasattr(v, "size")}
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
        assert all(torch.isfinite(t).all() for t in state.values())


def test_nonfinite_steps_can_be_skipped_up_to_a_limit(tiny_llama_dir, tmp_path):
    results = run_ranks(1, base_kwargs(tiny_llama_dir, tmp_path / "out", enable_fsdp=False, lr=1e30, max_train_step=8,
                                       max_nonfinite_steps=2), tmp_path / "r", expect_error=True)
    skipped = [ln for ln in results[0]["log"].splitlines() if "--max_nonfinite_steps" in ln]
    assert len(skipped) == 2 and all(f"{i} of at most 2" in ln for i, ln in enumerate(skipped, 1)), skipped
    assert results[0]["error"].startswith("TrainingDiverged")


def test_the_cli_reports_divergence_in_one_line_with_a_failing_status(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(repo / "finetuning.py"), "--model_name", str(tiny_llama_dir),
                           "--output_dir", str(tmp_path / "out"), "--lr", "1e30", "--max_train_step", "5",
                           "--context_length", "64", "--batch_size_training", "2", "--run_validation", "False",
                           "--num_workers_dataloader", "0"], capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "model").exists()


# ---------------------------------------------------------------------------------------------
# Pruning and leftovers
# ---------------------------------------------------------------------------------------------
def test_pruning_keeps_exactly_the_last_n_and_the_best(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    data = tmp_path / "small.json"
    from shardtune.configs.paths import BUNDLED_ALPACA_SAMPLE

    data.write_text(json.dumps(json.loads(Path(BUNDLED_ALPACA_SAMPLE).read_text())[:40]))
    run_ranks(2, base_kwargs(tiny_llama_dir, out, run_validation=True, max_eval_step=2, num_epochs=3, max_train_step=0,
                             keep_last_n_checkpoints=1, save_every_n_steps=1, lr=0.3, save_model=True,
                             **{"alpaca_dataset.data_path": str(data)}), tmp_path / "r")
    root = out / "checkpoints" / "fine-tuned"
    best = json.loads((root / "best.json").read_text())["checkpoint"]
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    newest = names[-1]
    assert names == sorted({best, newest}), names  # exactly the newest 1 plus the best, nothing else


def test_leftovers_of_killed_saves_are_cleaned_at_the_next_start(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    run_ranks(2, base_kwargs(tiny_llama_dir, out, save_every_n_steps=3), tmp_path / "r1")
    root = out / "checkpoints" / "fine-tuned"
    for junk in (out / ".tmp-1234abcd-model", root / ".tmp-step_000004", root / ".tmp-del-5678-step_000001",
                 out / "data_cache" / "tmpab12cd"):
        junk.mkdir(parents=True) if "cache" not in str(junk) else junk.write_text("partial")
    results = run_ranks(2, base_kwargs(tiny_llama_dir, out, max_train_step=4, resume_from="auto"), tmp_path / "r2")
    assert results[0]["log"].count("left by an interrupted save") == 4
    leftovers = [p for d in (out, root, out / "data_cache") for p in d.iterdir() if p.name.startswith((".tmp", "tmp"))]
    assert leftovers == []
