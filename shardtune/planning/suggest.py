"""The smallest change that makes a run fit its GPUs, tried in order of what it costs the run:

1. checkpoint every decoder layer (costs compute only: about a third more for each layer recomputed);
2. a smaller micro-batch with more gradient accumulation (the same optimizer step, more, smaller kernels);
3. CPU offload of the sharded states (host memory and PCIe traffic);
4. more GPUs (the same GPUs per host, more hosts);
5. LoRA instead of full fine-tuning (a different method).

Each candidate is planned in full (estimate.plan_run, the run's own parser and memory plan), so what it
suggests passes the run's checks. When no single change fits, the changes are combined in that order.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from shardtune.configs.fsdp import ShardingStrategy
from shardtune.errors import ConfigError
from shardtune.planning.estimate import Cluster, RunPlan, plan_run

MAX_SCALE = 16  # more GPUs: up to 16 times as many


@dataclass(frozen=True)
class Change:
    flags: str  # what to add to the command line (or to the plan's --gpus / --nodes)
    kwargs: Dict[str, Any]
    cluster: Cluster


def candidates(kwargs: Dict[str, Any], plan: RunPlan, run) -> List[List[Change]]:
    """For each kind of change (module docstring), its variants, smallest first."""
    t, f = run.train, run.fsdp
    cluster = plan.cluster
    kinds: List[List[Change]] = []
    if plan.checkpointed < plan.layers:
        kinds.append([Change("--fsdp_config.fsdp_activation_checkpointing True --fsdp_config.ac_every_n_layers 1",
                             {"fsdp_config.fsdp_activation_checkpointing": True,
                              "fsdp_config.ac_every_n_layers": 1}, cluster)])
    batches = []
    b = t.batch_size_training // 2
    while b >= 1:
        steps = -(-t.gradient_accumulation_steps * t.batch_size_training // b)  # the same samples per step
        batches.append(Change(f"--batch_size_training {b} --gradient_accumulation_steps {steps}",
                              {"batch_size_training": b, "gradient_accumulation_steps": steps}, cluster))
        b //= 2
    if batches:
        kinds.append(batches)
    if t.enable_fsdp and cluster.gpus > 1 and not f.fsdp_cpu_offload:
        kinds.append([Change("--fsdp_config.fsdp_cpu_offload", {"fsdp_config.fsdp_cpu_offload": True}, cluster)])
    if f.sharding_strategy is not ShardingStrategy.HYBRID_SHARD:  # HSDP: more replicas shard nothing further
        more, scale = [], 2
        while scale <= MAX_SCALE:
            gpus = cluster.gpus * scale
            bigger = Cluster(gpus, cluster.gpu_memory, max(1, gpus // max(cluster.ranks_per_node, 8)))
            extra = {} if t.enable_fsdp else {"enable_fsdp": True}
            more.append(Change(f"--gpus {bigger.gpus} --nodes {bigger.nodes}" + (" --enable_fsdp" if extra else ""),
                               extra, bigger))
            scale *= 2
        kinds.append(more)
    if not t.use_peft:
        kinds.append([Change("--use_peft --peft_method lora", {"use_peft": True, "peft_method": "lora"}, cluster)])
    return kinds


def _try(kwargs: Dict[str, Any], change: Change) -> Optional[RunPlan]:
    try:
        return plan_run({**kwargs, **change.kwargs}, change.cluster, quiet=True)
    except ConfigError:  # a change the run's checks refuse in this combination: not a suggestion
        return None


def smallest_change(kwargs: Dict[str, Any], plan: RunPlan, run) -> Tuple[Optional[str], Optional[RunPlan]]:
    """(the flags of the smallest change that fits, its plan), or (None, None) when nothing tried fits."""
    kinds = candidates(kwargs, plan, run)
    for variants in kinds:
        for change in variants:  # smallest first
            tried = _try(kwargs, change)
            if tried is not None and tried.fits:
                return change.flags, tried
    # No single change: combine them in order, each kind at its strongest variant, until one fits.
    flags, merged, cluster = [], dict(kwargs), plan.cluster
    for variants in kinds:
        change = variants[-1]
        merged.update(change.kwargs)
        cluster = change.cluster if change.cluster != plan.cluster else cluster
        flags.append(change.flags)
        tried = _try(merged, replace(change, kwargs={}, cluster=cluster))
        if tried is not None and tried.fits:
            return " ".join(flags), tried
    return None, None
