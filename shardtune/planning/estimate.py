"""A run's memory on paper: per GPU and per host, for a cluster that is not here.

The run's flags go through the run's own parser and checks (configs/parse.py ``parse_cli``, the model's
config.json, PEFT, sharding); the model is built by the run's own ``build_model`` on the meta device (no weights
read, no memory); the checkpointing plan is the run's ``plan_memory`` with an idle GPU of the planned size as its
budget. So the plan and the run cannot disagree: both call the same functions with the same inputs.

Per GPU (bytes, on the rank that holds most):
    parameters, gradients, optimizer state  shards of what the run stores (configs/precision.py), / shard size
    gathered parameters and loss workspace  the rest of the estimate's fixed part (policies/activation_budget.py)
    activations                             with the chosen checkpointing, and with none and every layer
    quantization state                      4-bit / 8-bit weights' absmax and scales (planning/quantized.py)
    peak reserved                           the peak times the allocator's measured factor (RESERVED_OVER_ESTIMATE_*)
    needed                                  peak reserved plus CUDA_CONTEXT_BYTES: what must fit the GPU
Per host: each rank's peak resident memory while the model is loaded and sharded (after that the weights live on
the GPUs): rank 0 always reads the weights; with --low_cpu_fsdp the other ranks build the model on the meta device
and receive rank 0's weights on their GPU; without it every rank reads them, and a sharded run on GPUs moves them
one FSDP unit at a time, giving each unit's host pages back (policies/placement.py), so it holds about one unit.
"""
from __future__ import annotations

import contextlib
import copy
import io
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch

from shardtune.configs import precision as P
from shardtune.configs.fsdp import StateDictType
from shardtune.configs.parse import parse_cli, resolve_compile
from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.models.builder import WeightSource, build_model, load_dtype
from shardtune.models.loading import ModelSource, check_against_model_config, load_model_config
from shardtune.models.loss import CausalLMWithLoss
from shardtune.models.peft import check_peft_inputs, check_peft_supported
from shardtune.models.quantization import check_quantization, is_quantized
from shardtune.observability.memory import GB
from shardtune.planning.quantized import quantize_on_meta
from shardtune.policies.activation_budget import (MemoryPlan, StepMemory, describe_gathered, describe_plan,
                                                  estimate_step_memory, plan_memory)
from shardtune.policies.compile import compile_decoder_layers
from shardtune.policies.fsdp import check_fsdp_config, plan_mesh
from shardtune.policies.wrapping import fsdp_units
from shardtune.utils.distributed import DistInfo

# The CUDA allocator's margin: peak reserved memory (torch.cuda.max_memory_reserved, what the GPU must hold) over the
# run's estimated peak, calibrated on every GPU row of benchmarks/README.md (one H200, batch 4 x 4096, section "Plan
# vs measured" has the plan commands). Measured reserved / estimate (quantization state included): full fine-tuning
# 1.065 (1B), 1.023 (3B), 1.003 (8B), 1.007 (8B, ac_memory_fraction 0.9); LoRA 0.913 (1B), 0.903 (8B); QLoRA 0.891
# (3B), and 0.953 at 3B with no layer checkpointed (issue 25's budget: 57.8 GB reserved, 60.5 GB estimated). The two
# kinds differ: under LoRA the frozen linears keep less for backward than the estimate's activation count (made for
# full fine-tuning) says, while full fine-tuning reserves 0-7% over its estimate (allocator slack). Each factor is
# the largest measured of its kind, rounded up, so the printed peak reserved is at or above every measurement and
# within 8% of it. Other PEFT methods (not measured) get the full factor; several GPUs are not measured yet.
RESERVED_OVER_ESTIMATE_FULL = 1.07
RESERVED_OVER_ESTIMATE_LORA = 0.96
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
    """Per GPU, in bytes. ``peak``: the run's estimate with the chosen plan, as the run logs it; ``peak_reserved``:
    what the CUDA allocator will reserve at that peak (``peak`` + ``quantization_state`` + ``allocator_margin``,
    calibrated: RESERVED_OVER_ESTIMATE_*; the margin is negative where the estimate errs high); ``needed``: that plus
    the CUDA context, what "fits" compares with the GPU."""

    parameters: int
    quantization_state: int  # 4-bit / 8-bit weights' absmax and scales: not parameters, not in the run's estimate
    gradients: int
    optimizer: int
    gathered_and_loss: int
    largest_gathered_unit: int
    activations: int
    peak: int
    allocator_margin: int
    peak_reserved: int
    cuda_context: int
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
    # Per rank, while training: the host copy that background checkpoints stage the local weights and optimizer
    # state into (model_checkpointing/async_save.py; kept for the whole run). 0: no background checkpoints.
    host_checkpoint_staging: int = 0

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
    return run


@dataclass(frozen=True)
class LaunchedRanks(DistInfo):
    """The planned run's ranks. With --enable_fsdp the run is launched by torchrun (or shardtune run), so it has a
    process group and shards even on one GPU (a mesh of one rank, as every GPU benchmark in benchmarks/ ran);
    without it, one plain process."""

    launched: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launched


def plan_run(kwargs: Dict[str, Any], cluster: Cluster, quiet: bool = False) -> RunPlan:
    """The plan of the run ``kwargs`` (finetuning flags, as fire passes them) on ``cluster``. The run's own log
    lines that building the model prints (attention, PEFT, compile) go to stderr, or nowhere when ``quiet`` (the
    variants suggest.py tries)."""
    cluster.check()
    run = parse_run(kwargs, cluster)
    t, f = run.train, run.fsdp
    dist_info = LaunchedRanks(world_size=cluster.gpus, device=PLANNED_DEVICE, launched=bool(t.enable_fsdp))
    model_config = load_model_config(ModelSource.parse(t.model_name))
    check_against_model_config(t, model_config)
    if t.use_peft:
        check_peft_supported(run, model_config.model_type)
        check_peft_inputs(run, model_config)
    precision = P.resolve(run, PLANNED_DEVICE, bf16_supported=True)  # every GPU of 80 GB class has bf16
    sharded = t.enable_fsdp and dist_info.distributed  # as finetuning.py and policies/fsdp.py wrap_model decide
    check_quantization(run, precision, sharded=sharded)
    if t.enable_fsdp:
        check_fsdp_config(run, dist_info)  # CPU offload, the mesh
    mesh = plan_mesh(run, cluster.gpus, cluster.ranks_per_node) if sharded else None

    with contextlib.redirect_stdout(io.StringIO() if quiet else sys.stderr):
        lm = build_model(run, WeightSource.for_run(run), precision, PLANNED_DEVICE, NO_TOKENIZER, meta=True,
                         packing=t.batching_strategy == "packing")
        parameters = sum(p.numel() for p in lm.parameters())  # before quantization packs them
        trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        quantization_state = quantize_on_meta(lm, run) if t.quantization else 0
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
    host = {low: host_memory(run, precision, parameters, model, layers, cluster, dist_info, low, checkpoint_dtype,
                             offloaded)
            for low in (True, False)}
    return RunPlan(
        cluster=cluster, model=t.model_name, precision=precision,
        parameters=parameters, trainable=trainable,
        mesh=mesh.description if mesh else ("one GPU, not sharded" if cluster.gpus == 1 else ""),
        checkpointed=len(memory_plan.layers), layers=memory_plan.n_layers, gathered=memory_plan.gathered,
        checkpointing=describe_plan(memory_plan), gathered_note=describe_gathered(memory_plan),
        gpu=gpu_memory(mem, memory_plan, states, offloaded, largest_unit(model, layers) * _compute_bytes(precision),
                       quantization_state, bool(t.use_peft and t.peft_method == "lora"))
        if mem else None,
        host_low_cpu=host[True], host_without=host[False], low_cpu_fsdp=bool(t.low_cpu_fsdp),
        host_checkpoint_staging=checkpoint_staging(run, model, precision, shard_size))


def checkpoint_staging(run: RunConfigs, model, precision: str, shard_size: int) -> int:
    """One rank's staging copy of a background checkpoint: what a sharded checkpoint stores (the trained weights
    and their two AdamW moments, in the master dtype), when periodic checkpoints are written in the background
    (as Checkpointer decides: --save_every_n_steps, SHARDED_STATE_DICT, --fsdp_config.async_checkpoint)."""
    t, f = run.train, run.fsdp
    if not (t.save_every_n_steps and f.async_checkpoint
            and f.checkpoint_type is StateDictType.SHARDED_STATE_DICT):
        return 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 3 * trainable * P.master_dtype(precision).itemsize // shard_size


def state_bytes(model, precision: str, shard_size: int, frozen_in_compute_dtype: bool) -> Dict[str, int]:
    """The stored parameters, gradients and AdamW state of one rank (the split of the estimate's states: per
    trainable parameter, parameter + gradient + two moments in the master dtype; frozen ones once, in the compute
    dtype under PEFT, quantized ones as they are packed)."""
    master = P.master_dtype(precision).itemsize
    frozen = P.frozen_dtype(precision).itemsize if frozen_in_compute_dtype else master
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    others = sum(p.numel() * (p.element_size() if is_quantized(p) else frozen)  # packed as bitsandbytes packs them
                 for p in model.parameters() if not p.requires_grad)
    return {"parameters": (trainable * master + others) // shard_size,
            "gradients": trainable * master // shard_size, "optimizer": 2 * trainable * master // shard_size}


def largest_unit(model, layers) -> int:
    """The parameters of the largest FSDP unit: a decoder layer or the root (embeddings, final norm, output layer)."""
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    return max([root] + [sum(p.numel() for p in layer.parameters()) for layer in layers])


def _compute_bytes(precision: str) -> int:
    return (P.compute_dtype(precision) or P.master_dtype(precision)).itemsize


def gpu_memory(mem: StepMemory, plan: MemoryPlan, states: Dict[str, int], offloaded: int, largest: int,
               quantization_state: int, lora: bool) -> GpuMemory:
    """The per-GPU figures of the run's estimate ``mem`` under its ``plan``, plus what the estimate does not see:
    the quantization state of 4-bit / 8-bit weights (planning/quantized.py) and the allocator's margin."""
    k, n = len(plan.layers), plan.n_layers
    peak = mem.peak(k, plan.gathered) - offloaded  # CPU offload keeps the states in host memory
    reserved = int((peak + quantization_state) * (RESERVED_OVER_ESTIMATE_LORA if lora else
                                                  RESERVED_OVER_ESTIMATE_FULL))
    return GpuMemory(parameters=states["parameters"], quantization_state=quantization_state,
                     gradients=states["gradients"],
                     optimizer=states["optimizer"], gathered_and_loss=mem.fixed - sum(states.values()),
                     largest_gathered_unit=largest, activations=mem.peak(k, 1) - mem.fixed, peak=peak,
                     allocator_margin=reserved - peak - quantization_state, peak_reserved=reserved,
                     cuda_context=CUDA_CONTEXT_BYTES, needed=reserved + CUDA_CONTEXT_BYTES, budget=plan.budget,
                     peak_no_checkpointing=mem.peak(0) - offloaded, peak_every_layer=mem.peak(n) - offloaded)


def host_memory(run: RunConfigs, precision: str, parameters: int, model, layers, cluster: Cluster,
                dist_info: DistInfo, low_cpu: bool, checkpoint_dtype: torch.dtype, offloaded: int) -> HostMemory:
    """Each rank's peak host memory while the model is loaded and sharded, with or without --low_cpu_fsdp (module
    docstring). ``parameters``: the model's, unpacked; ``offloaded``: the states CPU offload keeps in host memory (0
    without). A quantized model is read by every rank, whole, --low_cpu_fsdp or not (models/quantization.py)."""
    run = copy.deepcopy(run)
    run.train.low_cpu_fsdp = low_cpu
    dtype = load_dtype(run, precision, dist_info, WeightSource.for_run(run), checkpoint_dtype) \
        or P.master_dtype(precision)
    weights = parameters * dtype.itemsize
    unit = largest_unit(model, layers) * dtype.itemsize
    quantized = bool(run.train.quantization)
    one_unit_at_a_time = (run.train.enable_fsdp and dist_info.distributed and not low_cpu
                          and not run.fsdp.fsdp_cpu_offload and not quantized)
    reader = PROCESS_BASE_BYTES + (unit if one_unit_at_a_time else weights) + offloaded
    other = reader if quantized or not low_cpu else PROCESS_BASE_BYTES + offloaded
    per_node = cluster.ranks_per_node
    return HostMemory(rank0=reader, other_ranks=other, first_host=reader + (per_node - 1) * other,
                      other_hosts=per_node * other)
