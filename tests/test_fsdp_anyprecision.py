"""AnyPrecisionAdamW (policies/anyprecision_optimizer.py): AdamW's update with moments in a chosen dtype."""
from __future__ import annotations

import pytest
import torch

from shardtune.policies.anyprecision_optimizer import AnyPrecisionAdamW


def _train(make_opt, dtype, steps=100):
    torch.manual_seed(0)
    w0 = torch.randn(64, 64)
    p = torch.nn.Parameter(w0.clone().to(dtype))
    opt = make_opt([p])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        p.grad = (torch.randn(64, 64, generator=g) * 0.1 + (p.detach().float() - 1) * 0.01).to(dtype)
        opt.step()
    return p.detach().float(), w0, opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_moments_reproduce_torch_adamw(weight_decay):
    ref, _, _ = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=weight_decay, foreach=False),
                       torch.float32)
    got, _, opt = _train(lambda ps: AnyPrecisionAdamW(ps, lr=1e-3, weight_decay=weight_decay,
                                                      momentum_dtype=torch.float32, variance_dtype=torch.float32),
                         torch.float32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert float(state["step"]) == 100 and state["exp_avg"].dtype == torch.float32


def test_bf16_weights_follow_fp32_closer_with_kahan_summation():
    """bf16 weights with small updates: plain rounding loses most of them; the compensation buffer keeps
    them, so the weights end much closer to the fp32 trajectory."""
    ref, w0, _ = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1), torch.float32, 200)
    plain, _, opt = _train(lambda ps: AnyPrecisionAdamW(ps, lr=1e-4, weight_decay=0.1), torch.bfloat16, 200)
    kahan, _, kopt = _train(lambda ps: AnyPrecisionAdamW(ps, lr=1e-4, weight_decay=0.1, use_kahan_summation=True),
                            torch.bfloat16, 200)
    moved = (ref - w0).abs().mean()
    err_plain, err_kahan = (plain - ref).abs().mean(), (kahan - ref).abs().mean()
    assert err_plain > 0.8 * moved  # without compensation most of the small updates were rounded away
    assert err_kahan < 0.6 * err_plain
    state = kopt.state[kopt.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state["compensation"].dtype == torch.bfloat16
    assert "compensation" not in opt.state[opt.param_groups[0]["params"][0]]


@pytest.mark.parametrize("moments", [torch.bfloat16, torch.float32])
def test_state_dict_round_trip_continues_identically(moments):
    """Saved and loaded (as a checkpoint does), the optimizer continues exactly, its state in its own dtypes
    (torch's loader would cast fp32 moments of bf16 weights to bf16)."""
    import copy

    def fresh():
        torch.manual_seed(0)
        return torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))

    kw = dict(lr=1e-2, use_kahan_summation=True, momentum_dtype=moments, variance_dtype=moments)

    def step(p, opt, seed):
        p.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        opt.step()

    a = fresh()
    opt_a = AnyPrecisionAdamW([a], **kw)
    for s in range(3):
        step(a, opt_a, s)
    b = torch.nn.Parameter(a.detach().clone())
    opt_b = AnyPrecisionAdamW([b], **kw)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.state[b]["exp_avg"].dtype == moments
    for s in range(3, 6):
        step(a, opt_a, s)
        step(b, opt_b, s)
    assert torch.equal(a, b)
