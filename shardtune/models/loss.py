"""The training loss, computed from hidden states and labels in one swappable place.

Why not ``model(**batch).loss``:
* it averages over the tokens of one micro-batch, so gradient accumulation and data parallelism
  weight tokens unequally; we return the *sum* and the token count, and the training loop divides by
  the token count of the whole optimizer step over all ranks;
* it materialises logits for every position, prompt and padding included, and upcasts all of them.
  Here only positions with a supervised label go through the output layer, in fp32 for the softmax.

With a plain linear output layer the supervised rows go through :class:`ChunkedLinearCrossEntropy`:
a few thousand rows at a time, logits -> fp32 log-softmax -> loss and the gradients of hidden states and
weight, so the full (tokens x vocabulary) logits, their fp32 copy and their gradient never exist at once
(for Llama-3 with 128K vocabulary and 16K tokens that is 4 + 8 + 8 GB). Anything else (a PEFT-wrapped
head, a bias, quantized weights) takes the plain path through the module.
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


# Rows of logits per chunk: about 1 GiB of fp32 logits (2,093 rows for a 128K vocabulary).
CHUNK_BYTES = 2 ** 30


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i) without materialising all logits.

    Forward walks over row chunks; where gradients are needed it computes them right there
    (d loss / d logits = softmax - one_hot) and keeps only d hidden (N x H) and d weight (V x H, fp32
    accumulator), which backward scales by the incoming gradient. No logits are saved or recomputed.
    ``compute_dtype`` is the matmul dtype (bf16 under autocast); the softmax is always fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk_rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        softmax_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 in tests
        loss = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=softmax_dtype, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows].to(compute_dtype)
            y = targets[start:start + chunk_rows]
            logits = (h @ w.t()).to(softmax_dtype)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                grad = logits.sub_(lse[:, None]).exp_()                   # softmax, in place
                grad[torch.arange(y.shape[0], device=y.device), y] -= 1.0  # minus one-hot
                grad = grad.to(compute_dtype)
                if need_h:
                    grad_h[start:start + chunk_rows] = grad @ w
                if need_w:
                    grad_w += grad.t() @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def _chunkable_weight(output_layer) -> Optional[torch.Tensor]:
    """The weight of a plain bias-free linear output layer in a floating dtype, else None."""
    if type(output_layer) is not nn.Linear:  # PEFT / quantized wrappers run their own forward
        return None
    if output_layer.bias is not None or not output_layer.weight.is_floating_point():
        return None
    return output_layer.weight


def chunked_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Summed CE of ``hidden (N, H) @ weight.T (V, H)`` against ``targets (N,)``; see ChunkedLinearCrossEntropy."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, rows)


def linear_cross_entropy_sum(hidden: torch.Tensor, output_layer: Callable[[torch.Tensor], torch.Tensor],
                             labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy. hidden: (B, T, H) final hidden states; labels: (B, T), aligned
    with the inputs as in Hugging Face (position t predicts labels[t + 1])."""
    hidden = hidden[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    weight = _chunkable_weight(output_layer)
    if weight is not None:
        return chunked_linear_cross_entropy_sum(hidden[keep], weight, targets[keep])
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
