"""The training loss (CausalLMWithLoss) against an independent computation: Hugging Face's own
``model(..., labels=...).loss``, which averages next-token cross-entropy over the supervised tokens of a
batch. On unpacked, right-padded batches with prompt masking, our loss_sum must equal that mean times our
token count, and the gradients of loss_sum / num_tokens must equal the gradients of HF's loss.

Both paths are covered: the hidden-state path (only supervised positions go through the output layer:
Llama, GPT-2 with its tied head) and the full-logits path (models whose head is more than a linear layer,
here a tiny Gemma2 with final_logit_softcapping; and prefix tuning, which feeds past key/values).
"""
from __future__ import annotations

import json

import pytest
import torch

from shardtune.data.collate import PaddingCollator
from shardtune.models.loss import IGNORE_INDEX, CausalLMWithLoss, linear_cross_entropy_sum

REPO_FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def tok(bundled_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_tokenizer_dir)


@pytest.fixture(scope="module")
def padded_batch(tok):
    """Four Alpaca-format samples of different lengths (prompt labels -100), right-padded as in training."""
    from shardtune.datasets.alpaca_dataset import format_prompt
    from shardtune.datasets.common import tokenize_prompt_and_target

    records = json.loads((REPO_FIXTURES / "alpaca" / "alpaca_data.json").read_text(encoding="utf-8"))[:4]
    samples = [tokenize_prompt_and_target({"prompt": format_prompt(r), "target": r["output"]}, tok)
               for r in records]
    batch = PaddingCollator(tok.pad_token_id, max_length=4096)(samples)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the batch must contain padding"
    prompt_masked = (batch["labels"] == IGNORE_INDEX) & (batch["attention_mask"] == 1)
    assert prompt_masked.sum(1).min() > 0, "every sample has a masked prompt"
    return batch


def _tiny_gemma2(vocab_size: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       max_position_embeddings=512, sliding_window=64, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg)
    # Large output weights so that raw logits exceed the cap: soft-capping then changes the loss a lot.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(400.0)
    return model


def _hf_and_ours(model, batch):
    """(HF's mean loss, our LossOutput) and the two gradient sets, fp32. Eval mode turns dropout (GPT-2 has
    some) off, so that both forwards compute the same function; autograd works the same in eval mode."""
    model = model.float().eval()
    model.zero_grad()
    hf = model(**batch, use_cache=False).loss
    hf.backward()
    hf_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = CausalLMWithLoss(model)(**batch)
    (ours.loss_sum / ours.num_tokens).backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return hf, ours, hf_grads, our_grads


def _takes_hidden_path(model, batch) -> bool:
    """Whether the wrapper hands hidden states to its loss_fn (the hidden-state path) or computes the loss from
    the model's full logits (the loss_fn is then never called)."""
    calls = []

    def recording_loss(hidden, head, labels):
        calls.append(hidden.shape)
        return linear_cross_entropy_sum(hidden, head, labels)

    with torch.no_grad():
        CausalLMWithLoss(model, loss_fn=recording_loss)(**batch)
    return len(calls) == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2_softcapped"])
def test_loss_sum_equals_hf_mean_loss_times_tokens(arch, padded_batch, tiny_llama_dir, tiny_gpt2_dir, tok):
    from transformers import AutoModelForCausalLM

    if arch == "gemma2_softcapped":
        model = _tiny_gemma2(len(tok))
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir,
                                                     dtype=torch.float32)
    assert _takes_hidden_path(model, padded_batch) is (arch != "gemma2_softcapped")  # soft-capped: full logits
    hf, ours, hf_grads, our_grads = _hf_and_ours(model, padded_batch)

    supervised = int((padded_batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(ours.num_tokens) == supervised > 0
    assert ours.loss_sum.item() == pytest.approx(hf.item() * supervised, rel=1e-5)
    assert hf_grads.keys() == our_grads.keys() and len(hf_grads) == len(list(model.parameters()))
    for name in hf_grads:
        torch.testing.assert_close(our_grads[name], hf_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    if arch == "gemma2_softcapped":
        # Control: ignoring the cap (what the hidden-state path would compute) gives a clearly different loss,
        # so the equality above is a real check of the full-logits path.
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=padded_batch["input_ids"],
                                         attention_mask=padded_batch["attention_mask"]).last_hidden_state
            uncapped = linear_cross_entropy_sum(hidden, model.get_output_embeddings(), padded_batch["labels"])
        assert abs(float(uncapped) - ours.loss_sum.item()) > 0.1 * ours.loss_sum.item()


def test_prefix_tuning_takes_the_full_forward_and_matches_peft(padded_batch, tiny_llama_dir):
    """Prefix tuning feeds learned past key/values through PeftModel.forward; our loss must see them."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    with torch.no_grad():  # a non-trivial prefix, so that ignoring it would change the loss
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    assert _takes_hidden_path(model, padded_batch) is False
    hf, ours, hf_grads, our_grads = _hf_and_ours(model, padded_batch)
    n = int(ours.num_tokens)
    assert ours.loss_sum.item() == pytest.approx(hf.item() * n, rel=1e-5)
    assert hf_grads.keys() == our_grads.keys() and hf_grads  # only the prefix is trainable
    for name in hf_grads:
        torch.testing.assert_close(our_grads[name], hf_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        without_prefix = CausalLMWithLoss(model.get_base_model())(**padded_batch)
    # ignoring the prefix changes the loss by more than ten times the tolerance of the equality above
    assert abs(without_prefix.loss_sum.item() - ours.loss_sum.item()) > 1e-4 * ours.loss_sum.item()
