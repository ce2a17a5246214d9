"""A run's memory on paper: per GPU and per host, for a cluster that is not here.

The run's flags go through the run's own parser and checks (configs/parse.py ``parse_cli``, the model's
config.json, PEFT, sharding); the model is built by the run's own ``build_model`` on the meta device (no weights
read, no memory); the checkpointing plan is the run's ``plan_memory`` with an idle GPU of the planned size as its
budget. So the plan and the run cannot disagree: both call the same functions with the same inputs.

Per GPU (bytes, on the rank that holds most):
    parameters, gradients, optimizer state  shards of what the run stores (configs/precision.py), / shard size
    gathered parameters and loss workspace  the rest of the estimate's fixed part (policies/activation_budget.py)
    activations                             with the chosen checkpointing, and with none and every layer
    allocator margin                        ALLOCATOR_MARGIN of the peak, plus CUDA_CONTEXT_BYTES
Per host: each rank's peak resident memory while the model is loaded and sharded (after that the weights live on
the GPUs): rank 0 always reads the weights; with --low_cpu_fsdp the other ranks build the model on the meta device
and receive rank 0's weights on their GPU; without it every rank reads them, and a sharded run on GPUs moves them
one FSDP unit at a time, giving each unit's host pages back (policies/placement.py), so it holds about one unit.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch

from shardtune.configs import precision as P
from shardtune.configs.parse import parse_cli, resolve_compile
from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.models.builder import WeightSource, build_model, load_dtype
from shardtune.models.loading import ModelSource, check_against_model_config, load_model_config
from shardtune.models.loss import CausalLMWithLoss
from shardtune.models.peft import check_peft_inputs, check_peft_supported
from shardtune.models.quantization import check_quantization
from shardtune.observability.memory import GB
from shardtune.policies.activation_budget import (MemoryPlan, StepMemory, describe_gathered, describe_plan,
                                                  estimate_step_memory, plan_memory)
from shardtune.policies.compile import compile_decoder_layers
from shardtune.policies.fsdp import check_fsdp_config, plan_mesh
from shardtune.policies.wrapping import fsdp_units
from shardtune.utils.distributed import DistInfo

# Peak reserved over peak allocated with expandable segments, measured on H200 (benchmarks/README.md): 1.01 (1B
# LoRA), 1.05-1.08 (1B full, 8B LoRA), 1.13-1.18 (8B full, 8B LoRA 2 GPUs). The larger figure, so "fits" is safe.
ALLOCATOR_MARGIN = 0.18
CUDA_CONTEXT_BYTES = 2 ** 30  # CUDA context, cuBLAS workspace, NCCL buffers: outside the allocator's counters
# A rank's host memory besides the weights: Python, torch, transformers (0.3-0.4 GB measured on CPU without data,
# benchmarks/host_memory_slice.py), CUDA's libraries and the tokenised data on a GPU host (8B runs on H200 measured
# 2.3 GB per rank in all, the largest unit included: benchmarks/README.md, session 4).
PROCESS_BASE_BYTES = int(1.5 * GB)
PLANNED_DEVICE = torch.device("cuda")  # the device the planned run computes on (never touched here)
NO_TOKENIZER = ()  # the plan reads no tokenizer: the embedding keeps config.json's vocab_size


@dataclass(frozen=True)
class Cluster:
    """The GPUs the run is planned for: ``gpus`` in all (the world size) over ``nodes`` hosts."""

    gpus: int = 1
    gpu_memory: int = int(80 * GB)  # bytes (an "80 GB" H100 reports 79.6 GB of 2^30 bytes, an A100 80)
    nodes: int = 1

    @property
    def ranks_per_node(self) -> int:
        return self.gpus // self.nodes

    def check(self) -> "Cluster":
        if self.gpus < 1:
            raise ConfigError(f"--gpus {self.gpus}: the number of GPUs must be at least 1")
        if self.nodes < 1:
            raise ConfigError(f"--nodes {self.nodes}: the number of hosts must be at least 1")
        if self.gpus % self.nodes:
            raise ConfigError(f"--gpus {self.gpus} cannot be spread evenly over --nodes {self.nodes}: give a "
                              f"multiple of {self.nodes} (every host runs the same number of ranks)")
        if self.gpu_memory <= 0:
            raise ConfigError(f"--gpu_memory_gb {self.gpu_memory / GB:g}: a GPU's memory must be more than 0 "
                              "(e.g. 80 for an H100)")
        return self


@dataclass(frozen=True)
class GpuMemory:
    """Per GPU, in bytes. ``peak`` is the estimate with the chosen plan; ``needed`` adds the allocator's margin."""

    parameters: int
    gradients: int
    optimizer: int
    gathered_and_loss: int
    largest_gathered_unit: int
    activations: int
    peak: int
    allocator_margin: int
    needed: int
    budget: Optional[int]  # what the run's plan had to fit (--fsdp_config.ac_memory_fraction of the GPU)
    peak_no_checkpointing: int
    peak_every_layer: int


@dataclass(frozen=True)
class HostMemory:
    """Peak resident memory per rank while loading and sharding, in bytes, and per host (its ranks together)."""

    rank0: int
    other_ranks: int
    first_host: int
    other_hosts: int


@dataclass(frozen=True)
class RunPlan:
    cluster: Cluster
    model: str
    precision: str
    parameters: int
    trainable: int
    mesh: str
    checkpointed: int
    layers: int
    gathered: int
    checkpointing: str  # why, as the run logs it
    gathered_note: str  # the layers kept gathered, as the run logs it ('' when nothing is resharded)
    gpu: Optional[GpuMemory]  # None: no estimate for this architecture (the run checkpoints every layer)
    host_low_cpu: HostMemory
    host_without: HostMemory
    low_cpu_fsdp: bool

    @property
    def fits(self) -> bool:
        return self.gpu is not None and self.gpu.needed <= self.cluster.gpu_memory

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["fits"] = self.fits
        return d


def parse_run(kwargs: Dict[str, Any], cluster: Cluster) -> RunConfigs:
    """The run's flags parsed and checked as the run checks them before loading anything; raises ConfigError."""
    run = parse_cli(kwargs)
    t = run.train
    if cluster.gpus > 1 and not t.enable_fsdp:  # as finetuning.check_inputs says it under torchrun
        raise ConfigError(f"planned on {cluster.gpus} GPUs but without --enable_fsdp: add --enable_fsdp to shard the "
                          "model (or plan --gpus 1)")
    if t.quantization:
        raise ConfigError(f"--quantization {t.quantization}: shardtune plan cannot plan quantized runs yet "
                          "(bitsandbytes builds its 4-bit weights on a GPU, not on the meta device)")
    return run


def plan_run(kwargs: Dict[str, Any], cluster: Cluster) -> RunPlan:
    """The plan of the run ``kwargs`` (finetuning flags, as fire passes them) on ``cluster``."""
    cluster.check()
    run = parse_run(kwargs, cluster)
    t, f = run.train, run.fsdp
    dist_info = DistInfo(world_size=cluster.gpus, device=PLANNED_DEVICE)
    model_config = load_model_config(ModelSource.parse(t.model_name))
    check_against_model_config(t, model_config)
    if t.use_peft:
        check_peft_supported(run, model_config.model_type)
        check_peft_inputs(run, model_config)
    precision = P.resolve(run, PLANNED_DEVICE, bf16_supported=True)  # every GPU of 80 GB class has bf16
    check_quantization(run, precision, sharded=cluster.gpus > 1)
    sharded = t.enable_fsdp and cluster.gpus > 1
    if t.enable_fsdp:
        check_fsdp_config(run, dist_info)  # single-process leftovers, CPU offload
    mesh = plan_mesh(run, cluster.gpus, cluster.ranks_per_node) if sharded else None

    with contextlib.redirect_stdout(sys.stderr):  # the run's own log lines (attention, PEFT) stay off the plan
        lm = build_model(run, WeightSource.for_run(run), precision, PLANNED_DEVICE, NO_TOKENIZER, meta=True,
                         packing=t.batching_strategy == "packing")
        model = CausalLMWithLoss(lm)
        if resolve_compile(run, PLANNED_DEVICE):
            compile_decoder_layers(model)  # marks the layers only (nothing is traced on the meta device)
    layers = fsdp_units(model)
    shard_size = mesh.shape[-1] if mesh else 1
    reshard = mesh.reshard_after_forward if mesh else False  # one process: nothing resharded (fsdp.wrap_model)
    memory_plan = plan_memory(model, layers, run, precision, PLANNED_DEVICE, shard_size, reshard,
                              gpu_memory=cluster.gpu_memory)
    mem = memory_plan.estimate or estimate_step_memory(
        model, layers, precision, t.batch_size_training * t.context_length, shard_size, reshard,
        frozen_in_compute_dtype=t.use_peft)  # the run made no estimate (fixed plan): the same one, for the figures

    checkpoint_dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) \
        or torch.float32
    checkpoint_dtype = getattr(torch, checkpoint_dtype) if isinstance(checkpoint_dtype, str) else checkpoint_dtype
    states = state_bytes(model, precision, shard_size, t.use_peft)
    offloaded = sum(states.values()) if sharded and f.fsdp_cpu_offload else 0
    host = {low: host_memory(run, precision, model, layers, cluster, low, checkpoint_dtype, offloaded)
            for low in (True, False)}
    return RunPlan(
        cluster=cluster, model=t.model_name, precision=precision,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        mesh=mesh.description if mesh else ("one GPU, not sharded" if cluster.gpus == 1 else ""),
        checkpointed=len(memory_plan.layers), layers=memory_plan.n_layers, gathered=memory_plan.gathered,
        checkpointing=describe_plan(memory_plan), gathered_note=describe_gathered(memory_plan),
        gpu=gpu_memory(mem, memory_plan, states, offloaded, largest_unit(model, layers) * _compute_bytes(precision))
        if mem else None,
        host_low_cpu=host[True], host_without=host[False], low_cpu_fsdp=bool(t.low_cpu_fsdp))


def state_bytes(model, precision: str, shard_size: int, frozen_in_compute_dtype: bool) -> Dict[str, int]:
    """The stored parameters, gradients and AdamW state of one rank (the split of the estimate's states: per
    trainable parameter, parameter + gradient + two moments in the master dtype; frozen ones once, in the compute
    dtype under PEFT)."""
    master = P.master_dtype(precision).itemsize
    frozen = P.frozen_dtype(precision).itemsize if frozen_in_compute_dtype else master
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    others = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"parameters": (trainable * master + others * frozen) // shard_size,
            "gradients": trainable * master // shard_size, "optimizer": 2 * trainable * master // shard_size}


def largest_unit(model, layers) -> int:
    """The parameters of the largest FSDP unit: a decoder layer or the root (embeddings, final norm, output layer)."""
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    return max([root] + [sum(p.numel() for p in layer.parameters()) for layer in layers])


def _compute_bytes(precision: str) -> int:
    return (P.compute_dtype(precision) or P.master_dtype(precision)).itemsize


def gpu_memory(mem: StepMemory, plan: MemoryPlan, states: Dict[str, int], offloaded: int,
               largest: int) -> GpuMemory:
    k, n = len(plan.layers), plan.n_layers
    peak = mem.peak(k, plan.gathered) - offloaded  # CPU offload keeps the states in host memory
    margin = int(ALLOCATOR_MARGIN * peak) + CUDA_CONTEXT_BYTES
    return GpuMemory(parameters=states["parameters"], gradients=states["gradients"], optimizer=states["optimizer"],
                     gathered_and_loss=mem.fixed - sum(states.values()), largest_gathered_unit=largest,
                     activations=mem.peak(k, 1) - mem.fixed, peak=peak, allocator_margin=margin,
                     needed=peak + margin, budget=plan.budget, peak_no_checkpointing=mem.peak(0) - offloaded,
                     peak_every_layer=mem.peak(n) - offloaded)


def host_memory(run: RunConfigs, precision: str, model, layers, cluster: Cluster, low_cpu: bool,
                checkpoint_dtype: torch.dtype, offloaded: int) -> HostMemory:
    """Each rank's peak host memory while the model is loaded and sharded, with or without --low_cpu_fsdp (module
    docstring). ``offloaded``: the states CPU offload keeps in host memory (0 without)."""
    run = copy.deepcopy(run)
    run.train.low_cpu_fsdp = low_cpu
    dist_info = DistInfo(world_size=cluster.gpus, device=PLANNED_DEVICE)
    dtype = load_dtype(run, precision, dist_info, WeightSource.for_run(run), checkpoint_dtype) \
        or P.master_dtype(precision)
    weights = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    unit = largest_unit(model, layers) * dtype.itemsize
    one_unit_at_a_time = (run.train.enable_fsdp and cluster.gpus > 1 and not low_cpu
                          and not run.fsdp.fsdp_cpu_offload)
    reader = PROCESS_BASE_BYTES + (unit if one_unit_at_a_time else weights) + offloaded
    other = reader if not low_cpu else PROCESS_BASE_BYTES + offloaded
    per_node = cluster.ranks_per_node
    return HostMemory(rank0=reader, other_ranks=other, first_host=reader + (per_node - 1) * other,
                      other_hosts=per_node * other)
