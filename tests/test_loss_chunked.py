"""Chunked linear cross-entropy (models/loss.py) against F.cross_entropy on full logits: values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardtune.models.loss import IGNORE_INDEX, chunked_linear_cross_entropy_sum, linear_cross_entropy_sum


def _reference(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")  # fp64 throughout


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_matches_full_logits_in_value_and_gradients(chunk_rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (50,), generator=g)
    ours = chunked_linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=chunk_rows)
    (2.5 * ours).backward()  # a non-unit incoming gradient, as the loss scaling in the training loop gives
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = _reference(hidden, weight, targets)
    (2.5 * ref).backward()
    assert float(ours) == pytest.approx(float(ref), rel=1e-12)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_sum_takes_the_chunked_path_and_matches_the_module_path():
    """Through the training-loss entry point: a bias-free nn.Linear head (chunked) equals the same head
    called as a module on full logits (a bias makes it take the module path)."""
    torch.manual_seed(0)
    head = nn.Linear(16, 33, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 33, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    chunked = linear_cross_entropy_sum(hidden, head, labels)
    chunked.backward()
    gh, gw = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    targets, keep = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    full = F.cross_entropy(head(hidden[:, :-1])[keep].float(), targets[keep], reduction="sum")
    full.backward()
    assert float(chunked) == pytest.approx(float(full), rel=1e-5)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, head.weight.grad, rtol=1e-4, atol=1e-6)
    # Frozen head (LoRA): no weight gradient is computed, the hidden-state gradient still is.
    head.weight.requires_grad_(False)
    hidden.grad = None
    linear_cross_entropy_sum(hidden, head, labels).backward()
    torch.testing.assert_close(hidden.grad, gh, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_matches_within_bf16_tolerance():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True)
    targets = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=10)
        ref = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    assert float(ours) == pytest.approx(float(ref), rel=1e-3)
    assert weight.grad is None  # nothing ran backward yet; gradients come as fp32 like the weight
    ours.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
