"""Checkpoints: layout, atomic writes and pruning, both checkpoint types, conversion to Hugging Face /
PEFT folders that plain transformers loads, and inference from them."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_fsdp_support import base_kwargs, run_ranks

IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 64]])


def _logits(model_dir, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_sharded_checkpoints_layout_and_pruning(tiny_llama_dir, tmp_path):
    """SHARDED_STATE_DICT every step, keep the last 2: DCP shards of both ranks, per-rank RNG, trainer state,
    the run config, state.json and the manifest (written last) in simple step_* folders; nothing temporary left."""
    out = tmp_path / "out"
    run_ranks(2, base_kwargs(tiny_llama_dir, out, max_train_step=4, save_every_n_steps=1, keep_last_n_checkpoints=2),
              tmp_path / "ranks")
    root = out / "checkpoints" / "fine-tuned"
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]
    ckpt = root / "step_000004"
    names = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng", "manifest.json", "run_config.yaml",
            "state.json"} <= names
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["checkpoint_type"] == "SHARDED_STATE_DICT" and state["world_size"] == 2
    assert state["lr_scheduler"]["last_epoch"] == 0 and state["run_id"] == json.loads((out / "run.json").read_text())[
        "run_id"]
    ts = state["train_state"]
    assert ts["step"] == 4 and ts["epoch"] == 0 and ts["batches_in_epoch"] == 4 and ts["tokens_seen"] > 0
    assert math.isinf(ts["best_eval_loss"])


def test_prune_keeps_the_best_checkpoint(tmp_path):
    from shardtune.model_checkpointing.layout import BEST_FILE, STATE_FILE, list_checkpoints, prune

    root = tmp_path / "checkpoints" / "fine-tuned"
    for step in (1, 2, 3, 4):
        d = root / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / STATE_FILE).write_text(json.dumps({"train_state": {"step": step}}))
    (root / BEST_FILE).write_text(json.dumps({"checkpoint": "step_000001", "eval_loss": 1.0}))
    prune(root, run_id=None, keep_n=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_000001", "step_000003", "step_000004"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == []  # deleted whole


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_full_state_dict_checkpoint_is_a_hugging_face_folder(peft, tiny_llama_dir, tmp_path):
    """FULL_STATE_DICT gathers on rank 0 and writes a HF folder (or a PEFT adapter folder) that plain
    transformers/peft load, giving the trained model's logits (same as the run's own export)."""
    out = tmp_path / "out"
    flags = dict(use_peft=True) if peft else {}
    run_ranks(2, base_kwargs(tiny_llama_dir, out, save_model=True, save_every_n_steps=3,
                             **{"fsdp_config.checkpoint_type": "FULL_STATE_DICT"}, **flags), tmp_path / "ranks")
    model_dir = out / "checkpoints" / "fine-tuned" / "step_000003" / "model"
    assert (model_dir / "tokenizer.json").is_file()
    if peft:
        assert (model_dir / "adapter_config.json").is_file()
        got, want = _logits(tiny_llama_dir, model_dir), _logits(tiny_llama_dir, out / "model")
    else:
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
        got, want = _logits(model_dir), _logits(out / "model")
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.allclose(got, _logits(tiny_llama_dir), atol=1e-4)


@pytest.mark.parametrize("mode", ["full", "lora", "freeze"])
def test_convert_sharded_checkpoint_round_trip(mode, tiny_llama_dir, tmp_path):
    """A 2-rank sharded checkpoint -> `python -m shardtune.model_checkpointing.convert` -> a folder plain
    transformers (or peft on the base) loads, with exactly the logits of the trained model. Frozen layers
    (not stored in the checkpoint) come back from the base model."""
    from shardtune.model_checkpointing.convert import main as convert_main

    out = tmp_path / "out"
    flags = {"full": {}, "lora": dict(use_peft=True), "freeze": dict(freeze_layers=True, num_freeze_layers=1)}[mode]
    run_ranks(2, base_kwargs(tiny_llama_dir, out, save_model=True, save_every_n_steps=3, **flags), tmp_path / "ranks")
    converted = tmp_path / "converted"
    # a checkpoint root works too: its newest checkpoint is converted
    assert convert_main(["--checkpoint", str(out / "checkpoints" / "fine-tuned"), "--output", str(converted)]) == 0
    if mode == "lora":
        assert (converted / "adapter_config.json").is_file()
        got, want = _logits(tiny_llama_dir, converted), _logits(tiny_llama_dir, out / "model")
    else:
        assert (converted / "model.safetensors").is_file()
        got, want = _logits(converted), _logits(out / "model")
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.allclose(got, _logits(tiny_llama_dir), atol=1e-4)


def test_convert_rejects_a_folder_without_checkpoint(tmp_path, capsys):
    from shardtune.model_checkpointing.convert import main as convert_main

    assert convert_main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert str(tmp_path) in capsys.readouterr().err  # the folder, named in the one error line


def test_inference_from_base_plus_adapter_and_converted_folder(tiny_llama_dir, tmp_path, capsys):
    """`python -m shardtune.inference` generates from base + adapter and from a converted folder; greedy
    generation with the adapter equals generation by the merged model."""
    from shardtune.inference import generate, load_for_inference
    from shardtune.inference import main as infer_main

    out = tmp_path / "out"
    run_ranks(2, base_kwargs(tiny_llama_dir, out, save_model=True, use_peft=True, lr=3e-2), tmp_path / "ranks")
    prompt = "Give three tips for staying healthy."
    assert infer_main(["--model_name", str(tiny_llama_dir), "--peft_model", str(out / "model"), "--prompt",
                       prompt, "--max_new_tokens", "8"]) == 0
    printed = capsys.readouterr().out
    (completion,) = generate(*load_for_inference(str(tiny_llama_dir), str(out / "model")), [prompt], 8)
    assert completion.strip() and completion.strip() in printed  # the adapter's own completion, printed

    model, tok = load_for_inference(str(tiny_llama_dir), str(out / "model"))
    merged_dir = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    adapter_text = generate(*load_for_inference(str(tiny_llama_dir), str(out / "model")), ["Hello there"], 8)
    merged_text = generate(*load_for_inference(str(merged_dir)), ["Hello there"], 8)
    assert adapter_text == merged_text and adapter_text[0]
    assert infer_main(["--model_name", str(tiny_llama_dir), "--peft_model", str(tiny_llama_dir), "--prompt", "x"]) == 2


def test_merge_helper_writes_a_bf16_model_equal_to_base_plus_adapter(tiny_llama_dir, tmp_path, capsys):
    """`python -m shardtune.model_checkpointing.merge` (the QLoRA route to a plain model): the written bf16 folder
    gives base + adapter's logits within bf16 rounding, differs from the base, and bad input is one line."""
    from shardtune.model_checkpointing.merge import main as merge_main

    out = tmp_path / "out"
    run_ranks(2, base_kwargs(tiny_llama_dir, out, save_model=True, use_peft=True, lr=3e-2), tmp_path / "ranks")
    merged = tmp_path / "merged"
    assert merge_main(["--adapter", str(out / "model"), "--output", str(merged), "--model_name",
                       str(tiny_llama_dir)]) == 0
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(merged / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
        assert not any("lora" in k for k in fh.keys())
    want, got, base = _logits(tiny_llama_dir, out / "model"), _logits(merged), _logits(tiny_llama_dir)
    assert ((got - want).norm() / want.norm()) < 3e-2
    assert ((got - want).norm() / want.norm()) < 0.2 * ((base - want).norm() / want.norm())  # the adapter is in
    capsys.readouterr()
    assert merge_main(["--adapter", str(out / "model"), "--output", str(merged)]) == 2  # never overwrites
    assert merge_main(["--adapter", str(tiny_llama_dir), "--output", str(tmp_path / "m2")]) == 2
    assert "error: --output" in capsys.readouterr().err
