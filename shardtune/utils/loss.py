"""The training loss, computed from hidden states and labels in one swappable place.

Why not ``model(**batch).loss``:
* it averages over the tokens of one micro-batch, so gradient accumulation and data parallelism
  weight tokens unequally; we return the *sum* and the token count, and the training loop divides by
  the token count of the whole optimizer step over all ranks;
* it materialises logits for every position, prompt and padding included, and upcasts all of them.
  Here only positions with a supervised label go through the output layer, in fp32 for the softmax.

A fused or chunked linear cross-entropy replaces :func:`linear_cross_entropy_sum` without touching
the rest: it receives the final hidden states, the output layer and the labels.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class LossOutput(NamedTuple):
    loss_sum: torch.Tensor    # fp32 scalar: summed cross-entropy over supervised tokens
    num_tokens: torch.Tensor  # int64 scalar: supervised tokens in this micro-batch


def count_supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Positions that contribute to the loss: label (shifted by one) is not IGNORE_INDEX."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def linear_cross_entropy_sum(hidden: torch.Tensor, output_layer: Callable[[torch.Tensor], torch.Tensor],
                             labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy. hidden: (B, T, H) final hidden states; labels: (B, T), aligned
    with the inputs as in Hugging Face (position t predicts labels[t + 1])."""
    hidden = hidden[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = output_layer(hidden[keep])          # (N, V): only supervised positions
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def logits_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss from full logits (used when the model's head is more than one linear layer)."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")


# Config attributes that mean "the logits are not just output_layer(hidden)". Such models, and PEFT
# prompt-learning methods (prefix tuning feeds past key/values through the top-level forward), take
# the full-forward path.
_HEAD_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _plain_linear_head(config) -> bool:
    for attr in _HEAD_MODIFIERS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return False
    return True


class CausalLMWithLoss(nn.Module):
    """Wraps a Hugging Face causal LM (or a PeftModel around one) for training.

    ``forward`` runs the decoder to its final hidden states and hands them, with the output layer
    and labels, to ``loss_fn``. Being a module, it is also the FSDP root: the embedding, final norm
    and output layer are gathered by its pre-forward hook; decoder layers are their own FSDP units.
    The wrapped model is ``self.lm`` (save and export use it directly).
    """

    def __init__(self, lm: nn.Module, loss_fn=linear_cross_entropy_sum):
        super().__init__()
        self.lm = lm
        self.loss_fn = loss_fn
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        prompt_learning = bool(getattr(getattr(lm, "active_peft_config", None), "is_prompt_learning", False))
        self._hidden_path = (not prompt_learning and _plain_linear_head(base.config)
                             and base.get_output_embeddings() is not None)
        self._base = [base]  # a list so that nn.Module does not register it twice

    @property
    def base_model(self) -> nn.Module:
        """The underlying transformers model (below any PEFT wrapper)."""
        return self._base[0]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> LossOutput:
        num_tokens = count_supervised_tokens(labels)
        if self._hidden_path:
            base = self.base_model
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False).last_hidden_state
            loss_sum = self.loss_fn(hidden, base.get_output_embeddings(), labels)
        else:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
            loss_sum = logits_cross_entropy_sum(logits, labels)
        return LossOutput(loss_sum, num_tokens)
