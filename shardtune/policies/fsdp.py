"""Sharding a model with FSDP2 (``torch.distributed.fsdp.fully_shard``): the device mesh, the units,
numerics, activation checkpointing, CPU offload and rank-0-only weight loading.

The reference's FSDP1 flags map onto FSDP2 like this:

=====================  ===========================================================================
sharding_strategy      FSDP2
=====================  ===========================================================================
FULL_SHARD             1-D mesh over all ranks; re-sharded after forward but the last layers
SHARD_GRAD_OP          same mesh; ``reshard_after_forward=False`` (gathered parameters kept for backward)
NO_SHARD               2-D mesh (world x 1): every rank holds everything, gradients are all-reduced
HYBRID_SHARD           2-D mesh (replicas x shard group): shard inside a group, all-reduce across groups
=====================  ===========================================================================

HYBRID_SHARD always gets an explicit mesh: ``--fsdp_config.hsdp --sharding_group_size S
--replica_group_size R`` (S x R = world size), or without ``--hsdp`` one shard group per node
(LOCAL_WORLD_SIZE ranks). The mesh is logged.

Order in :func:`shard_model`: pure-bf16 cast (on the host only where units are not placed on the device one by
one) -> activation checkpointing -> ``fully_shard`` on every
decoder layer -> ``fully_shard`` on the root (``CausalLMWithLoss``) -> for ``--low_cpu_fsdp``, weights
broadcast from rank 0 and non-persistent buffers rebuilt.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from shardtune.configs.fsdp import ShardingStrategy
from shardtune.configs.needs import fields_needing, flag
from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.policies.placement import UnitPlacer, load_full_state_from_rank0
from shardtune.utils.distributed import DistInfo
from shardtune.utils.logging import log, log_all


# ---------------------------------------------------------------------------------------------
# Validation and the device mesh
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeshPlan:
    """The data-parallel layout: ``shape`` is (world,) or (replicas, shard group size)."""

    shape: Tuple[int, ...]
    dim_names: Tuple[str, ...]
    reshard_after_forward: bool
    description: str


def local_world_size(world_size: int) -> int:
    """Ranks per node, as torchrun reports it (LOCAL_WORLD_SIZE); the whole world when unknown."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def plan_mesh(run: RunConfigs, world_size: int, node_size: Optional[int] = None) -> MeshPlan:
    """The mesh for --fsdp_config.sharding_strategy (and --hsdp). Raises ConfigError on impossible sizes."""
    f = run.fsdp
    strategy = f.sharding_strategy
    if strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
        zero3 = strategy is ShardingStrategy.FULL_SHARD
        return MeshPlan((world_size,), ("shard",), zero3,
                        f"{strategy.name}: parameters sharded over {world_size} ranks"
                        + ("" if zero3 else ", kept gathered from forward to backward"))
    if strategy is ShardingStrategy.NO_SHARD:
        return MeshPlan((world_size, 1), ("replicate", "shard"), False,
                        f"NO_SHARD: {world_size} full replicas, gradients all-reduced")
    # HYBRID_SHARD
    if f.hsdp:
        s, r = f.sharding_group_size, f.replica_group_size
        if s < 1 or r < 1 or s * r != world_size:
            raise ConfigError(f"--fsdp_config.hsdp: sharding_group_size {s} x replica_group_size {r} = {s * r}, "
                              f"but {world_size} processes were launched; pick S x R = {world_size}")
        how = f"explicit mesh from --sharding_group_size {s} --replica_group_size {r}"
    else:
        s = node_size if node_size is not None else local_world_size(world_size)
        if s < 1 or world_size % s:
            raise ConfigError(f"--fsdp_config.sharding_strategy HYBRID_SHARD: {world_size} processes cannot be split "
                              f"into shard groups of {s} (ranks per node); use --fsdp_config.hsdp "
                              f"--sharding_group_size S --replica_group_size R with S x R = {world_size}")
        r = world_size // s
        how = f"one shard group per node (LOCAL_WORLD_SIZE={s}); set --hsdp to choose sizes"
    return MeshPlan((r, s), ("replicate", "shard"), True,
                    f"HYBRID_SHARD: {r} replica(s) x shard groups of {s} ({how})")


def check_fsdp_config(run: RunConfigs, dist_info: DistInfo) -> None:
    """Everything about sharding that can fail on user input; call before the weights are read."""
    if not run.train.enable_fsdp:
        return  # configs/validate.py already refused the FSDP-only options
    if not dist_info.distributed:
        # --enable_fsdp in one process trains without sharding (activation checkpointing still applies): an
        # option that only a sharded run uses (it declares needs="enable_fsdp") would be silently ignored.
        for cfg in (run.train, run.fsdp):
            defaults = type(cfg)()
            for name in fields_needing(type(cfg), "enable_fsdp"):
                if getattr(cfg, name) != getattr(defaults, name):
                    raise ConfigError(f"{flag(type(cfg).__name__, name)} has no effect in a single process (nothing "
                                      "is sharded): launch with torchrun --nproc_per_node N, or drop it")
        return
    if run.fsdp.fsdp_cpu_offload and dist_info.device.type != "cuda":
        raise ConfigError("--fsdp_config.fsdp_cpu_offload needs CUDA GPUs (it keeps shards in host memory and moves "
                          "them to the GPU for compute); on CPU the model is in host memory already: drop the flag")
    plan_mesh(run, dist_info.world_size)


def build_mesh(run: RunConfigs, dist_info: DistInfo):
    from torch.distributed.device_mesh import init_device_mesh

    plan = plan_mesh(run, dist_info.world_size)
    mesh = init_device_mesh(dist_info.device.type, plan.shape, mesh_dim_names=plan.dim_names)
    return mesh, plan


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, run: RunConfigs, dist_info: DistInfo, precision: str, on_device: bool = False):
    """The wrap step of a run: (model ready to train, set_gradient_sync for the loop).

    Under torchrun with --enable_fsdp: sharded by ``shard_model``. In one process: moved to the device
    (``on_device``: a quantized model is there already) with the same per-layer activation checkpointing as
    under FSDP, and gradient sync is a no-op.
    """
    if run.train.enable_fsdp and dist_info.distributed:
        return shard_model(model, run, dist_info, precision), set_gradient_sync
    if run.train.enable_fsdp:
        log("--> --enable_fsdp with a single process: training without sharding")
    if not on_device:
        model.to(dist_info.device)
    from shardtune.policies.activation_budget import describe_plan
    from shardtune.policies.wrapping import fsdp_units

    # reshard_after_forward=False: nothing is sharded (autocast keeps a compute-dtype copy of each weight).
    _, memory_plan = checkpoint_layers(model, fsdp_units(model), run, precision, dist_info.device, shard_size=1,
                                       reshard_after_forward=False)
    log(f"--> activation checkpointing {describe_plan(memory_plan)}")
    return model, lambda m, sync: None


def shard_model(model: nn.Module, run: RunConfigs, dist_info: DistInfo, precision: str) -> nn.Module:
    """Shard ``model`` (the CausalLMWithLoss wrapper) in place with FSDP2 and return it.

    With --low_cpu_fsdp, rank 0 holds the real weights and the other ranks a meta-device copy; the
    weights reach the other ranks by broadcast after sharding, so no rank but 0 ever holds them whole.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from shardtune.policies import mixed_precision
    from shardtune.policies.activation_budget import describe_gathered, describe_plan
    from shardtune.policies.mixed_precision import describe, mp_policy_for
    from shardtune.policies.wrapping import describe_units, fsdp_units

    check_fsdp_config(run, dist_info)
    f, t = run.fsdp, run.train
    device = dist_info.device
    mesh, plan = build_mesh(run, dist_info)

    low_cpu = t.low_cpu_fsdp and not t.quantization
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and not low_cpu:
        raise RuntimeError("the model is on the meta device but --low_cpu_fsdp is off: nothing would fill it")
    place = UnitPlacer(precision, None if on_meta or f.fsdp_cpu_offload else device, frozen_in_compute_dtype=t.use_peft)
    # bf16_pure: bf16 parameters (buffers such as RoPE frequencies stay fp32). Where the units are placed on the
    # device one at a time (below), UnitPlacer casts each there: a cast here would copy the whole model on the host
    # (an fp32 checkpoint). --low_cpu_fsdp's rank 0 casts here, so that it broadcasts bf16.
    if place.device is None or low_cpu:
        mixed_precision.cast_parameters(model, precision)
    if t.quantization:
        from shardtune.models.quantization import prepare_for_sharding

        prepare_for_sharding(model)

    # Rank 0's full weights for --low_cpu_fsdp, taken before sharding replaces the parameters. (A quantized
    # model was loaded by every rank itself: see models/quantization.py.)
    full_state = model.state_dict() if low_cpu and dist_info.is_main else {}

    units_msg = describe_units(model)
    layers, memory_plan = checkpoint_layers(model, fsdp_units(model), run, precision, device,
                                            shard_size=plan.shape[-1], reshard_after_forward=plan.reshard_after_forward)

    offload = OffloadPolicy()
    if f.fsdp_cpu_offload:
        offload = CPUOffloadPolicy(pin_memory=True)
    kwargs = dict(mesh=mesh, mp_policy=mp_policy_for(precision), offload_policy=offload)
    for i, layer in enumerate(layers):
        place(layer.parameters())
        # The last layers keep their gathered parameters for backward (at least the last one, which backward needs
        # first: freeing it would only all-gather it again at once, with nothing to overlap that with); how many
        # more is the memory plan's choice (policies/activation_budget.py).
        kept = i >= len(layers) - memory_plan.gathered
        fully_shard(layer, reshard_after_forward=plan.reshard_after_forward and not kept, **kwargs)
    # Likewise the root's parameters (embeddings, final norm, output layer) stay gathered after forward.
    place(p for p in model.parameters() if not isinstance(p, DTensor))  # what no layer took
    fully_shard(model, reshard_after_forward=False, **kwargs)

    if low_cpu:
        if on_meta:
            model.to_empty(device="cpu" if f.fsdp_cpu_offload else device)
        load_full_state_from_rank0(model, full_state)
        del full_state
        rss = peak_rss_mb()
        log_all(f"--> low_cpu_fsdp: weights {'read from disk' if dist_info.is_main else 'received from rank 0'}; "
                f"peak host RSS so far {rss:.0f} MB")

    gathered = describe_gathered(memory_plan)
    log(f"--> FSDP2 {plan.description}; mesh {tuple(plan.shape)} {list(plan.dim_names)}; units {units_msg}; "
        f"{describe(precision)}; activation checkpointing {describe_plan(memory_plan)}; "
        + (f"{gathered}; " if gathered else "") + f"CPU offload {'on' if f.fsdp_cpu_offload else 'off'}")
    return model


def checkpoint_layers(model: nn.Module, layers: list, run: RunConfigs, precision: str, device: torch.device,
                      shard_size: int, reshard_after_forward: bool):
    """Plan the step's memory (policies/activation_budget.py) and checkpoint the decoder layers the plan picks.

    Returns (the layers with checkpointed ones replaced by their wrappers: the modules to shard, the memory plan:
    what was checkpointed and how many layers stay gathered)."""
    from shardtune.policies.activation_budget import plan_memory
    from shardtune.policies.activation_checkpointing import apply_activation_checkpointing

    plan = plan_memory(model, layers, run, precision, device, shard_size, reshard_after_forward)
    wrapped = iter(apply_activation_checkpointing(model, [layers[i] for i in plan.layers]) if plan.layers else [])
    chosen = set(plan.layers)
    return [next(wrapped) if i in chosen else layer for i, layer in enumerate(layers)], plan


# ---------------------------------------------------------------------------------------------
# Training-loop hooks
# ---------------------------------------------------------------------------------------------
def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Gradient accumulation: reduce gradients over ranks only on the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def peak_rss_mb() -> float:
    """This process's peak resident host memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
