"""FSDP2 on CPU (gloo, 2 forked ranks calling finetuning.main): sharding strategies, HSDP meshes, mixed precision,
activation checkpointing, PEFT, low-CPU loading. (2 ranks training like 1 rank with twice the batch: test_training.py.)

Every 2-rank run is ~1.5 s; see test_fsdp_support.py for the harness.
"""
from __future__ import annotations

import re

import pytest
import torch
from test_fsdp_support import ac_decision, base_kwargs, log_line, run_ranks, step_losses

from shardtune.configs.parse import parse_cli
from shardtune.errors import ConfigError
from shardtune.utils.distributed import DistInfo

STRATEGIES = {
    "FULL_SHARD": {},
    "SHARD_GRAD_OP": {"fsdp_config.sharding_strategy": "SHARD_GRAD_OP"},
    "NO_SHARD": {"fsdp_config.sharding_strategy": "NO_SHARD"},
    "HYBRID_SHARD_node_mesh": {"fsdp_config.sharding_strategy": "HYBRID_SHARD"},
    "HSDP_1x2": {"fsdp_config.sharding_strategy": "HYBRID_SHARD", "hsdp": True, "sharding_group_size": 2,
                 "replica_group_size": 1},
    "HSDP_2x1": {"fsdp_config.sharding_strategy": "HYBRID_SHARD", "hsdp": True, "sharding_group_size": 1,
                 "replica_group_size": 2},
}


def _cfg(**flags):
    return parse_cli({"model_name": "unused", "enable_fsdp": True, **flags})


def test_mesh_plans_for_every_strategy():
    from shardtune.policies.fsdp import plan_mesh

    assert plan_mesh(_cfg(), 4).shape == (4,)
    assert plan_mesh(_cfg(), 4).reshard_after_forward is True
    sgo = plan_mesh(_cfg(**{"fsdp_config.sharding_strategy": "SHARD_GRAD_OP"}), 4)
    assert sgo.shape == (4,) and sgo.reshard_after_forward is False
    assert plan_mesh(_cfg(**{"fsdp_config.sharding_strategy": "NO_SHARD"}), 4).shape == (4, 1)
    hybrid = _cfg(**{"fsdp_config.sharding_strategy": "HYBRID_SHARD"})
    plan = plan_mesh(hybrid, 16, node_size=8)  # 2 nodes of 8: shard in a node, replicate across nodes
    assert plan.shape == (2, 8) and plan.dim_names == ("replicate", "shard")
    assert "LOCAL_WORLD_SIZE=8" in plan.description
    hsdp = _cfg(**{"fsdp_config.sharding_strategy": "HYBRID_SHARD", "hsdp": True, "sharding_group_size": 4,
                   "replica_group_size": 4})
    assert plan_mesh(hsdp, 16, node_size=8).shape == (4, 4)  # explicit sizes win over the node size


def test_bad_mesh_sizes_are_one_line_config_errors():
    from shardtune.policies.fsdp import check_fsdp_config, plan_mesh

    hsdp = _cfg(**{"fsdp_config.sharding_strategy": "HYBRID_SHARD", "hsdp": True, "sharding_group_size": 3,
                   "replica_group_size": 1})
    with pytest.raises(ConfigError, match=r"sharding_group_size 3 x replica_group_size 1 = 3, but 2 processes") as e:
        plan_mesh(hsdp, 2)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot be split into shard groups of 2"):
        plan_mesh(_cfg(**{"fsdp_config.sharding_strategy": "HYBRID_SHARD"}), 3, node_size=2)
    offload = _cfg(enable_fsdp=True, **{"fsdp_config.fsdp_cpu_offload": True})
    with pytest.raises(ConfigError, match="fsdp_cpu_offload needs CUDA GPUs"):
        check_fsdp_config(offload, DistInfo(0, 0, 2, torch.device("cpu")))


def test_hsdp_size_mismatch_stops_the_launcher(tiny_llama_dir, tmp_path):
    kwargs = base_kwargs(tiny_llama_dir, tmp_path / "out", **STRATEGIES["HSDP_1x2"])
    kwargs["replica_group_size"] = 2  # 2 x 2 != 2 processes
    results = run_ranks(2, kwargs, tmp_path / "ranks", expect_error=True)
    for r in results:
        assert r["error"].startswith("ConfigError: --fsdp_config.hsdp") and "2 x replica_group_size 2" in r["error"]


# ---------------------------------------------------------------------------------------------
# Strategies and data parallelism
# ---------------------------------------------------------------------------------------------
def test_every_sharding_strategy_gives_the_same_losses(tiny_llama_dir, tmp_path):
    """fp32: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD and explicit HSDP meshes all compute the same
    steps (only where parameters live differs); every rank logs the mesh it built."""
    curves = {}
    for name, flags in STRATEGIES.items():
        out = tmp_path / name
        results = run_ranks(2, base_kwargs(tiny_llama_dir, out, **flags), tmp_path / f"{name}-ranks")
        curves[name] = step_losses(out)
        fsdp = log_line(results[0]["log"], "--> FSDP2")  # the mesh: (replicas, shard group) and where it came from
        if name.startswith("HSDP"):
            s, r = flags["sharding_group_size"], flags["replica_group_size"]
            assert f"({r}, {s})" in fsdp and "--sharding_group_size" in fsdp, fsdp
        if name == "HYBRID_SHARD_node_mesh":
            assert "(1, 2)" in fsdp and "LOCAL_WORLD_SIZE=2" in fsdp, fsdp
        if name == "NO_SHARD":
            assert "(2, 1)" in fsdp, fsdp
    base = curves.pop("FULL_SHARD")
    assert len(base) == 3
    for name, curve in curves.items():
        assert curve == pytest.approx(base, abs=1e-6), name


def _where_parameters_live(rank: int, world: int, model_dir: str) -> dict:
    """Shard the tiny Llama with each strategy through shard_model; report, per rank, the mesh and placement of a
    decoder-layer parameter and how many decoder-layer parameter elements (and gradient elements) this rank
    holds at rest, right after forward, and after backward."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from shardtune.models.loading import decoder_layers
    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.policies.fsdp import shard_model

    def held(params) -> int:  # elements this rank stores: its shard of a DTensor, all of a gathered tensor
        return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)

    from shardtune.policies import activation_budget as AB

    report = {}
    ids = torch.arange(1, 33).reshape(2, 16)
    # Beyond the strategies: layers kept gathered by flag, and by the memory plan with a budget (faked: there is no
    # GPU here) that has room for every layer, or none at all (just under the smallest estimate: every layer
    # checkpointed, the last one gathered).
    kept = {"FULL_SHARD_keep_2": ({"fsdp_config.keep_gathered_layers": 2}, None),
            "FULL_SHARD_auto_room": ({}, 10 ** 13), "FULL_SHARD_auto_tight": ({}, "peak")}
    for name, (flags, budget) in {**{k: (v, None) for k, v in STRATEGIES.items()}, **kept}.items():
        if budget is not None:
            def device_budget(device, fraction, budget=budget):
                return budget if budget != "peak" else AB.estimate_step_memory(
                    model, decoder_layers(model), "fp32", tokens=run.train.batch_size_training *
                    run.train.context_length, shard_size=2).peak(len(decoder_layers(model)), 1) - 1
            AB.device_budget = device_budget
        run = parse_cli({"model_name": model_dir, "enable_fsdp": True, "precision": "fp32", **flags})
        model = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
        layers = decoder_layers(model)
        full = sum(p.numel() for layer in layers for p in layer.parameters())
        shard_model(model, run, DistInfo(rank, rank, world, torch.device("cpu")), "fp32")
        sample = next(layers[0].parameters())
        at_rest = held(p for layer in layers for p in layer.parameters())
        out = model(input_ids=ids, labels=ids)
        after_forward = held(p for layer in layers for p in layer.parameters())
        out.loss_sum.backward()
        report[name] = {"mesh": list(sample.device_mesh.shape), "placements": [repr(x) for x in sample.placements],
                        "full": full,
                        "last": sum(p.numel() for p in layers[-1].parameters()), "at_rest": at_rest, "after_forward": after_forward,
                        "after_backward": held(p for layer in layers for p in layer.parameters()),
                        "grads": held(p.grad for layer in layers for p in layer.parameters())}
    return report


def test_sharding_strategies_place_parameters_and_gradients_as_documented(tiny_llama_dir, tmp_path, monkeypatch):
    """Where each strategy keeps the decoder layers on 2 ranks: ZeRO-3 (FULL_SHARD, HYBRID_SHARD, HSDP 1x2) holds
    half of them at every point but the last layer after forward (kept gathered: backward needs it first);
    SHARD_GRAD_OP (ZeRO-2) holds them whole from forward to backward; NO_SHARD and
    HSDP 2x1 replicate them whole, gradients included. FULL_SHARD keeps more layers gathered after forward with
    --fsdp_config.keep_gathered_layers, or by default when the memory budget has room for them."""
    import functools

    from test_fsdp_support import run_fn_ranks

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one node of 2 ranks, for HYBRID_SHARD's node mesh
    reports = run_fn_ranks(functools.partial(_where_parameters_live, model_dir=str(tiny_llama_dir)), 2, tmp_path)
    assert reports[0] == reports[1]  # the tiny layers split evenly: both ranks hold the same amounts
    report = reports[0]
    full = report["FULL_SHARD"]["full"]
    half = full // 2
    last_gathered = half + report["FULL_SHARD"]["last"] // 2  # the last layer's other half stays after forward
    expected = {  # mesh, placements, held at rest / after forward / after backward, gradient elements held
        "FULL_SHARD": ([2], ["Shard(dim=0)"], half, last_gathered, half, half),
        "SHARD_GRAD_OP": ([2], ["Shard(dim=0)"], half, full, half, half),
        "NO_SHARD": ([2, 1], ["Replicate()", "Shard(dim=0)"], full, full, full, full),
        "HYBRID_SHARD_node_mesh": ([1, 2], ["Replicate()", "Shard(dim=0)"], half, last_gathered, half, half),
        "HSDP_1x2": ([1, 2], ["Replicate()", "Shard(dim=0)"], half, last_gathered, half, half),
        "HSDP_2x1": ([2, 1], ["Replicate()", "Shard(dim=0)"], full, full, full, full),
        # FULL_SHARD with more layers kept gathered: all of them (2 of 2) after forward, still half at rest
        "FULL_SHARD_keep_2": ([2], ["Shard(dim=0)"], half, full, half, half),
        "FULL_SHARD_auto_room": ([2], ["Shard(dim=0)"], half, full, half, half),
        "FULL_SHARD_auto_tight": ([2], ["Shard(dim=0)"], half, last_gathered, half, half),
    }
    for name, (mesh, placements, at_rest, after_forward, after_backward, grads) in expected.items():
        got = report[name]
        assert (got["mesh"], got["placements"]) == (mesh, placements), name
        assert (got["at_rest"], got["after_forward"], got["after_backward"], got["grads"]) == \
            (at_rest, after_forward, after_backward, grads), name


# ---------------------------------------------------------------------------------------------
# Numerics, activation checkpointing
# ---------------------------------------------------------------------------------------------
def test_mixed_precision_modes(tiny_llama_dir, tmp_path):
    """bf16_mixed (forced on CPU with --precision), fp16_mixed (gradient scaler) and bf16_pure with
    AnyPrecisionAdamW (bf16 moments, Kahan summation) train under FSDP: curves close to fp32 but not equal
    (the low-precision compute really happened)."""
    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "fp32"), tmp_path / "fp32-ranks")
    ref = step_losses(tmp_path / "fp32")
    modes = {
        "bf16_mixed": dict(precision="bf16_mixed"),
        "fp16_mixed": dict(precision="fp16_mixed"),
        "bf16_pure": dict(precision="bf16_pure", **{"fsdp_config.optimizer": "anyprecision",
                                                     "use_kahan_summation": True}),
    }
    for name, flags in modes.items():
        results = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / name, **flags), tmp_path / f"{name}-ranks")
        curve = step_losses(tmp_path / name)
        assert len(curve) == 3 and all(c == c for c in curve), name
        assert curve == pytest.approx(ref, abs=0.02), name
        assert curve != ref, f"{name}: identical to fp32, low precision was not applied"
        fsdp = log_line(results[0]["log"], "--> FSDP2")  # the dtypes of the parameters and of the reduction
        param_dtype = {"bf16_mixed": "bfloat16", "fp16_mixed": "float16", "bf16_pure": "as stored"}[name]
        assert re.search(rf"\b{param_dtype}\b", fsdp) and ("float32" in fsdp) == (name != "bf16_pure"), fsdp


def test_activation_checkpointing_is_exact(tiny_llama_dir, tmp_path):
    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "plain", **{"fsdp_config.fsdp_activation_checkpointing": False}),
              tmp_path / "plain-ranks")
    results = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "ac"), tmp_path / "ac-ranks")  # the default
    assert "2 of 2" in ac_decision(results[0]["log"])
    assert step_losses(tmp_path / "ac") == pytest.approx(step_losses(tmp_path / "plain"), abs=1e-6)


def test_activation_checkpointing_wraps_each_layer_once(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from shardtune.models.loading import decoder_layers
    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.policies.activation_checkpointing import apply_activation_checkpointing, is_checkpointed

    model = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    keys = set(model.state_dict())
    layers = decoder_layers(model)
    first = apply_activation_checkpointing(model, layers)
    second = apply_activation_checkpointing(model, layers)  # no nesting
    assert len(first) == len(layers) == 2 and [id(m) for m in first] == [id(m) for m in second]
    assert all(is_checkpointed(m) and not is_checkpointed(m._checkpoint_wrapped_module) for m in first)
    assert set(model.state_dict()) == keys  # checkpoints and exports see the usual names


# ---------------------------------------------------------------------------------------------
# PEFT, freezing, low-CPU loading
# ---------------------------------------------------------------------------------------------
def test_freeze_layers_under_fsdp(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "out", freeze_layers=True, num_freeze_layers=1,
                             save_model=True), tmp_path / "ranks")
    trained = load_file(tmp_path / "out" / "model" / "model.safetensors")
    init = load_file(tiny_llama_dir / "model.safetensors")
    assert torch.equal(trained["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(trained["model.layers.1.mlp.up_proj.weight"], init["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_low_cpu_fsdp_gives_the_same_run(peft, tiny_llama_dir, tmp_path):
    """Rank 0 reads the weights, rank 1 builds on the meta device and receives them by broadcast; RoPE
    buffers are rebuilt (without that every loss is NaN). Same losses as loading on every rank."""
    flags = dict(use_peft=True) if peft else {}
    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "normal", **flags), tmp_path / "normal-ranks")
    results = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "low", low_cpu_fsdp=True, **flags),
                        tmp_path / "low-ranks")
    assert step_losses(tmp_path / "low") == pytest.approx(step_losses(tmp_path / "normal"), abs=1e-6)
    lines = [log_line(r["log"], "--> low_cpu_fsdp") for r in results]
    assert "disk" in lines[0] and "rank 0" in lines[1] and all(re.search(r"\d+ MB", ln) for ln in lines), lines


def test_low_cpu_fsdp_when_the_tokenizer_outgrows_the_embedding(tiny_llama_dir, tmp_path):
    """Rank 0 resizes the real embedding (new rows from the old ones' statistics); meta ranks only take the
    new shape and receive the rows by broadcast: same run as resizing on every rank."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    small = tmp_path / "small_vocab"
    shutil.copytree(tiny_llama_dir, small)
    cfg = AutoConfig.from_pretrained(small)
    cfg.vocab_size -= 16
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
    run_ranks(2, base_kwargs(small, tmp_path / "normal"), tmp_path / "normal-ranks")
    results = run_ranks(2, base_kwargs(small, tmp_path / "low", low_cpu_fsdp=True), tmp_path / "low-ranks")
    assert "resizing" in log_line(results[0]["log"], "embedding has")
    assert step_losses(tmp_path / "low") == pytest.approx(step_losses(tmp_path / "normal"), abs=1e-6)


def _scaler_skips_on_every_rank(rank: int, world: int) -> dict:
    """fp16 + FSDP2: an inf in one rank's gradient shard must make every rank skip the step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from shardtune.policies.mixed_precision import mp_policy_for

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh, mp_policy=mp_policy_for("fp16_mixed"))
    fully_shard(model, mesh=mesh, mp_policy=mp_policy_for("fp16_mixed"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.to_local().clone() for p in model.parameters()]
    out = {}
    for step, poison in enumerate((True, False)):
        scaler.scale(model(torch.randn(4, 8)).sum()).backward()
        if poison and rank == 1:
            next(iter(model.parameters())).grad.to_local().fill_(float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        changed = any(not torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
        out[f"step{step}"] = {"changed": changed, "scale": scaler.get_scale()}
        before = [p.to_local().clone() for p in model.parameters()]
    return out


def test_grad_scaler_found_inf_is_shared_by_all_ranks(tmp_path):
    from test_fsdp_support import run_fn_ranks

    results = run_fn_ranks(_scaler_skips_on_every_rank, 2, tmp_path)
    for r in results:  # rank 0's shard was finite, yet it skipped too, and both halved the scale
        assert r["step0"] == {"changed": False, "scale": 512.0}
        assert r["step1"]["changed"] and r["step1"]["scale"] == 512.0


def _pure_bf16_from_an_fp32_checkpoint(rank: int, world: int, model_dir: str) -> dict:
    """shard_model on a model read in fp32 (as a sharded GPU run reads an fp32 checkpoint) with bf16_pure: each
    unit is cast while it is placed, no host-wide cast first."""
    from transformers import AutoModelForCausalLM

    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.policies import mixed_precision
    from shardtune.policies.fsdp import shard_model

    def no_host_wide_cast(model, mode):
        raise AssertionError("the whole model was cast on the host before placement")

    mixed_precision.cast_parameters = no_host_wide_cast  # this forked rank only
    run = parse_cli({"model_name": model_dir, "enable_fsdp": True, "fsdp_config.pure_bf16": True})
    model = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    shard_model(model, run, DistInfo(rank, rank, world, torch.device("cpu")), "bf16_pure")
    ids = torch.arange(1, 33).reshape(2, 16)
    loss = model(input_ids=ids, labels=ids).loss_sum
    loss.backward()
    return {"params": sorted({str(p.dtype) for p in model.parameters()}),
            "grads": sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None}),
            "buffers": sorted({str(b.dtype) for b in model.buffers()}), "finite": bool(torch.isfinite(loss))}


def test_pure_bf16_casts_each_unit_while_placing_it(tiny_llama_dir, tmp_path):
    import functools

    from test_fsdp_support import run_fn_ranks

    fn = functools.partial(_pure_bf16_from_an_fp32_checkpoint, model_dir=str(tiny_llama_dir))
    for report in run_fn_ranks(fn, 2, tmp_path):
        assert report == {"params": ["torch.bfloat16"], "grads": ["torch.bfloat16"], "buffers": ["torch.float32"],
                          "finite": True}
