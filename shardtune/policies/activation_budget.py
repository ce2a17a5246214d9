"""The step's GPU memory plan: how many decoder layers to checkpoint (the fewest that keep a step within a GPU
memory budget) and, with the room left, how many to keep gathered from forward to backward.

Activation checkpointing trades compute for memory: a checkpointed layer keeps only its input during
forward and runs its forward again in backward (about a third more compute for that layer). Checkpointing
every layer, as the reference does, pays that price even when the activations would have fit. With
``--fsdp_config.ac_every_n_layers 0`` (the default) the run estimates its step's peak memory before
sharding and checkpoints only as many layers as the budget needs:

    estimate = parameter, gradient and optimizer shards + parameters gathered for compute + loss workspace
               + for each layer: its activations (not checkpointed) or its input (checkpointed)
               + one layer's activations (the one being recomputed in backward)
    budget   = by default (--fsdp_config.ac_memory_fraction 0): what the same step takes run the conventional
               way, i.e. every layer checkpointed and the loss over the whole logits at once (llama-recipes,
               Hugging Face);
               with --fsdp_config.ac_memory_fraction f > 0: f x the GPU's memory;
               either way capped by what is free on the GPU now plus what this process holds, the smallest
               over ranks.

Why that default: shardtune's chunked cross-entropy never holds the (tokens x vocabulary) logits, their fp32
copy and the fp32 log-probabilities at once (10 bytes a logit: 19.6 GB for 4 x 4096 tokens of Llama 3's
128K vocabulary), which a conventional step holds at its loss. The plan spends the memory that saves, and
no more, on recomputing fewer layers: by default a run reserves no more GPU memory than the conventional
recipe on the same command, and is faster. The budget comes from the run's own shapes, so it follows
batch, context, vocabulary, precision, PEFT and sharding, unlike a share of the GPU (0.5 of an H200 was 1.65x
the reference's memory for Llama-3.2-3B QLoRA, and less than the reference's for Llama-3.1-8B full).
Spending a GPU's free memory for more speed is ``--fsdp_config.ac_memory_fraction 0.5`` (or 0.9) away. The
10 bytes a logit match the reference's measured peaks (Llama-3.2-1B, pure bf16: 31 GB allocated; this
formula gives 32.4 GB), which a user of it has sized the GPU for.

The activation figure per layer and token, for a Llama-style block, is ``compute bytes x (9 hidden + 3 kv
+ 4 intermediate)`` in eager mode (norm inputs in fp32, q/k/v before and after RoPE, attention output, the
MLP's gate, up, activation and product) and ``x (9 hidden + 3 kv + 2 intermediate)`` when the layers are
compiled: inductor's partitioner recomputes the MLP's activation and product from gate and up in backward
instead of saving them (measured on H200, Llama-3.2-1B shape, 16K tokens: 71 KB per token and layer; the
compiled formula gives 73 KB, the eager one 105 KB). With that, the estimate is close to what runs reserve:
measured peak reserved over the estimate 0.90-1.06 on one H200 at Llama-3.2-1B, 3.2-3B and 3.1-8B shapes,
full, LoRA and QLoRA (benchmarks/README.md, session 6); LoRA runs keep less than estimated. Models whose
config lacks ``hidden_size`` / ``intermediate_size`` get every layer checkpointed, as does any run off CUDA (no
GPU memory to budget). The choice is made once from the smallest budget over ranks, so every rank
checkpoints the same layers, and it is logged with its numbers.

Under FULL_SHARD and HYBRID_SHARD a layer's gathered parameters are freed after its forward and all-gathered
again in backward. That second all-gather mostly overlaps compute, but its kernels share the GPU's SMs with the
matrix multiplications and slow them (measured on 2 x H200: +7% GEMM time, benchmarks/README.md). With
``--fsdp_config.keep_gathered_layers -1`` (the default) the budget's room left after checkpointing keeps the last
layers gathered instead (each costs its full parameters, e.g. 0.12 GB for a Llama-3.2-1B layer in bf16): every
layer of a 1B model on two GPUs, few or none of an 8B model that needs checkpointing. Not when one rank holds
the whole model (shard_size 1): its "all-gather" is a local copy, so keeping layers gathered costs their memory
and saves nothing measurable (Llama-3.2-1B, one H200: 68.5K tokens/s with all 16 kept, 67.5-70.4K with one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from shardtune.configs import precision as P
from shardtune.models.quantization import is_quantized
from shardtune.observability.memory import GB  # the unit of every memory figure shardtune prints

WHOLE_LOSS_BYTES_PER_LOGIT = 10  # a conventional loss at its peak: bf16 logits + fp32 copy + fp32 log-softmax


@dataclass(frozen=True)
class StepMemory:
    """Estimated bytes of one training step on one rank, split into what the plan can and cannot change."""

    fixed: int              # parameter/gradient/optimizer shards, gathered parameters, loss workspace
    layer_activations: int  # what one decoder layer keeps for backward when it is not checkpointed
    layer_input: int        # what a checkpointed layer keeps (its input hidden states)
    n_layers: int
    layer_gathered: int = 0  # one decoder layer's gathered parameters, when layers are resharded after forward
    whole_logits_loss: int = 0  # what a loss over the whole logits holds beyond the chunked loss's workspace

    def peak(self, checkpointed: int, gathered: int = 1) -> int:
        """The estimated peak with ``checkpointed`` of the layers checkpointed and the last ``gathered`` layers kept
        gathered from forward to backward. ``fixed`` holds two gathered layers (the last one, kept, and the one
        backward prefetches next); each further kept layer adds its parameters."""
        kept = self.n_layers - checkpointed
        recompute = self.layer_activations if checkpointed else 0
        extra_gathered = max(0, min(gathered + 1, self.n_layers) - 2) * self.layer_gathered
        return self.fixed + kept * self.layer_activations + checkpointed * self.layer_input + recompute \
            + extra_gathered

    def conventional(self) -> int:
        """The estimated peak of the same step run the conventional way (the default budget): every layer
        checkpointed, every layer resharded after forward, the loss over the whole logits at once."""
        return self.peak(self.n_layers, 1) + self.whole_logits_loss


@dataclass(frozen=True)
class MemoryPlan:
    """The decoder layers checkpointed (indices) and how many, counted from the last, stay gathered from forward to
    backward; each with why, in words for the log (``gathered_reason`` empty: nothing is resharded anyway)."""

    layers: List[int]
    n_layers: int
    reason: str
    gathered: int
    gathered_reason: str = ""
    estimate: Optional[StepMemory] = None  # what the choice was made from (None: no estimate was made)
    budget: Optional[int] = None


def fewest_checkpointed(mem: StepMemory, budget: int) -> int:
    """The smallest number of checkpointed layers whose estimated peak fits ``budget`` (all layers if none does)."""
    for k in range(mem.n_layers + 1):
        if mem.peak(k) <= budget:
            return k
    return mem.n_layers


def most_gathered(mem: StepMemory, checkpointed: int, budget: int) -> int:
    """The most layers that can stay gathered from forward to backward with ``checkpointed`` layers checkpointed
    and the peak within ``budget`` (at least the last layer, which backward needs first)."""
    for kept in range(mem.n_layers, 1, -1):
        if mem.peak(checkpointed, kept) <= budget:
            return kept
    return 1


def spread(k: int, n: int) -> List[int]:
    """``k`` of ``n`` layer indices spread evenly (k = n: all of them)."""
    return sorted({(i * n) // k for i in range(k)}) if k else []


def estimate_step_memory(model: nn.Module, layers: List[nn.Module], precision: str, tokens: int, shard_size: int,
                         reshard_after_forward: bool = True, frozen_in_compute_dtype: bool = False,
                         compiled: bool = False) -> Optional[StepMemory]:
    """The step's memory on one rank for a micro-batch of ``tokens`` tokens, or None for an unknown block shape.

    ``shard_size``: ranks that share one copy of the parameters (1 without sharding). States per trainable
    parameter: parameter, gradient and AdamW's two moments, in the master dtype. Frozen parameters are stored
    in the compute dtype under PEFT (``frozen_in_compute_dtype``, as policies/placement.py's UnitPlacer stores them), quantized
    ones as they are. ``compiled``: the decoder layers run under torch.compile (they save fewer activations).
    """
    config = _text_config(model)
    h = getattr(config, "hidden_size", None)
    inter = getattr(config, "intermediate_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (h and inter and heads):
        return None
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    vocab = getattr(config, "vocab_size", None) or 0

    master = P.master_dtype(precision).itemsize
    compute = (P.compute_dtype(precision) or P.master_dtype(precision)).itemsize
    frozen = P.frozen_dtype(precision).itemsize if frozen_in_compute_dtype else master
    states = gathered_root = largest_layer = 0
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    for p in model.parameters():
        n = p.numel()
        per_param = 4 * master if p.requires_grad else (p.element_size() if is_quantized(p) else frozen)
        states += n * per_param // max(1, shard_size)
        if id(p) not in in_layers:
            gathered_root += n * compute
    for layer in layers:
        largest_layer = max(largest_layer, sum(p.numel() for p in layer.parameters()) * compute)
    if reshard_after_forward:
        gathered = gathered_root + 2 * largest_layer  # the root stays gathered; one layer computing, one prefetched
    else:
        gathered = gathered_root + len(layers) * largest_layer  # every unit stays gathered from forward to backward

    from shardtune.models.loss import CHUNK_BYTES

    # Chunked cross-entropy: up to three chunks of fp32 logits (logits, softmax, gradient; all rows at once when
    # they fit in one chunk) plus the hidden states and their gradient in fp32.
    loss = min(3 * CHUNK_BYTES, 3 * tokens * vocab * 4) + tokens * h * 8
    # The conventional loss: bf16 logits, their fp32 copy and the fp32 log-probabilities, 10 bytes a logit.
    whole_logits = tokens * vocab * WHOLE_LOSS_BYTES_PER_LOGIT
    per_token = compute * (9 * h + 3 * kv + (2 if compiled else 4) * inter)
    return StepMemory(fixed=states + gathered + loss, layer_activations=tokens * per_token,
                      layer_input=tokens * h * compute, n_layers=len(layers),
                      layer_gathered=largest_layer if reshard_after_forward else 0,
                      whole_logits_loss=max(0, whole_logits - min(3 * CHUNK_BYTES, 3 * tokens * vocab * 4)))


def device_budget(device: torch.device, fraction: float) -> Optional[int]:
    """What this GPU can give the step: ``fraction`` of its memory (the whole of it for fraction 0), capped by what
    is free on it now; None off CUDA. Under a process group, the smallest over ranks, so that every rank makes the
    same choice."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    # What this process holds already (a quantized model is loaded onto the GPU) is counted by the estimate.
    usable = free + torch.cuda.memory_reserved(device)
    from shardtune.utils import distributed

    return distributed.agree(min(idle_gpu_budget(total, fraction), usable), device, op="min")


def step_budget(gpu_budget: int, mem: Optional[StepMemory], fraction: float) -> int:
    """The plan's budget: the GPU's (``device_budget``) when a fraction was given, else no more than the
    conventional step would take (module docstring). The same on every rank: ``mem`` is."""
    if fraction > 0 or mem is None:
        return gpu_budget
    return min(gpu_budget, mem.conventional())


def describe_budget(budget: int, mem: StepMemory, fraction: float) -> str:
    """Where the budget came from, for the log."""
    if fraction > 0:
        return (f"the budget {budget / GB:.1f} GB (--fsdp_config.ac_memory_fraction {fraction} of the GPU, capped by "
                f"free memory)")
    capped = " (capped by free memory)" if budget < mem.conventional() else ""
    return (f"the budget {budget / GB:.1f} GB{capped}, what the step takes with every layer checkpointed and the "
            f"loss over whole logits (--fsdp_config.ac_memory_fraction 0.5 spends up to half the GPU for speed)")


def plan_memory(model: nn.Module, layers: List[nn.Module], run, precision: str, device: torch.device,
                shard_size: int, reshard_after_forward: bool = True, gpu_memory: Optional[int] = None) -> MemoryPlan:
    """Which decoder layers to checkpoint and how many to keep gathered, under ``run``'s fsdp_config (see the
    module docstring). Checkpointing comes first: recomputing a layer costs compute, while all-gathering it again
    in backward mostly overlaps compute; the room the budget has left then keeps layers gathered.
    ``gpu_memory``: the bytes of an idle GPU that is not here (``shardtune plan``), budgeted instead of asking CUDA."""
    f, t = run.fsdp, run.train
    n = len(layers)
    auto_ac = f.fsdp_activation_checkpointing and f.ac_every_n_layers == 0
    auto_gathered = reshard_after_forward and f.keep_gathered_layers < 0 and shard_size > 1
    budget = mem = None
    if auto_ac or auto_gathered:
        # collective: every rank takes this branch alike (shardtune plan passes the idle GPU it plans for)
        gpu_budget = (device_budget(device, f.ac_memory_fraction) if gpu_memory is None
                      else idle_gpu_budget(gpu_memory, f.ac_memory_fraction))
        if gpu_budget is not None:
            tokens = t.batch_size_training * t.context_length  # packing: exact; padding: samples cut to context_length
            compiled = any(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
            mem = estimate_step_memory(model, layers, precision, tokens, shard_size, reshard_after_forward,
                                       frozen_in_compute_dtype=t.use_peft, compiled=compiled)
            budget = step_budget(gpu_budget, mem, f.ac_memory_fraction)
    no_estimate = (f"auto, no GPU memory to budget on {device.type}" if budget is None else
                   f"auto, no memory estimate for a {type(_text_config(model)).__name__}")

    # 1. Activation checkpointing.
    if not f.fsdp_activation_checkpointing:
        layers_ac, why_ac = [], "off"
    elif f.ac_every_n_layers >= 1:
        layers_ac = list(range(0, n, f.ac_every_n_layers))
        why_ac = f"--fsdp_config.ac_every_n_layers {f.ac_every_n_layers}"
    elif mem is None:
        layers_ac, why_ac = list(range(n)), no_estimate
    else:
        k = fewest_checkpointed(mem, budget)
        fits = mem.peak(k) <= budget
        layers_ac = spread(k, n)
        why_ac = (f"auto: estimated peak {mem.peak(k) / GB:.1f} GB {'within' if fits else 'OVER'} "
                  f"{describe_budget(budget, mem, f.ac_memory_fraction)}; no checkpointing would need "
                  f"{mem.peak(0) / GB:.1f} GB, every layer {mem.peak(n) / GB:.1f} GB")

    # 2. Layers kept gathered from forward to backward (only where layers are resharded after forward at all).
    if not reshard_after_forward:
        gathered, why_gathered = n, ""
    elif f.keep_gathered_layers >= 0:
        gathered = min(n, max(1, f.keep_gathered_layers))
        why_gathered = f"--fsdp_config.keep_gathered_layers {f.keep_gathered_layers}"
    elif shard_size == 1:
        gathered, why_gathered = 1, "auto: one rank holds every parameter, its all-gather is a local copy"
    elif mem is None:
        gathered, why_gathered = 1, no_estimate
    else:
        gathered = most_gathered(mem, len(layers_ac), budget)
        peak = mem.peak(len(layers_ac), gathered)  # over the budget when even every layer checkpointed is (as logged)
        why_gathered = (f"auto: estimated peak {peak / GB:.1f} GB {'within' if peak <= budget else 'OVER'} the budget "
                        f"{budget / GB:.1f} GB" + (f"; all {n} would need {mem.peak(len(layers_ac), n) / GB:.1f} GB"
                                                   if gathered < n else ""))
    return MemoryPlan(layers_ac, n, why_ac, gathered, why_gathered, estimate=mem, budget=budget)


def describe_plan(plan: MemoryPlan) -> str:
    """The activation checkpointing part of the plan, for the log."""
    if plan.reason == "off":
        return "off"
    return f"on for {len(plan.layers)} of {plan.n_layers} decoder layers ({plan.reason})"


def describe_gathered(plan: MemoryPlan) -> str:
    """The layers kept gathered, for the log ('' when nothing is resharded after forward anyway)."""
    if not plan.gathered_reason:
        return ""
    return (f"the last {plan.gathered} of {plan.n_layers} decoder layers stay gathered from forward to backward "
            f"({plan.gathered_reason})")


def _text_config(model: nn.Module):
    config = getattr(getattr(model, "base_model", model), "config", None)  # CausalLMWithLoss: below any PEFT wrapper
    return getattr(config, "text_config", None) or config


def idle_gpu_budget(total: int, fraction: float) -> int:
    """The budget of an idle GPU of ``total`` bytes (device_budget caps it by what is free; shardtune plan uses it
    as it is)."""
    return int((fraction or 1.0) * total)  # fraction 0: the whole GPU, the step's own budget caps it
