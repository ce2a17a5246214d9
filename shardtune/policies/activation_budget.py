"""How many decoder layers to checkpoint: the fewest that keep a step within a GPU memory budget.

Activation checkpointing trades compute for memory: a checkpointed layer keeps only its input during
forward and runs its forward again in backward (about a third more compute for that layer). Checkpointing
every layer, as the reference does, pays that price even when the activations would have fit. With
``--fsdp_config.ac_every_n_layers 0`` (the default) the run estimates its step's peak memory before
sharding and checkpoints only as many layers as the budget needs:

    budget   = min(ac_memory_fraction x the GPU's memory, what is free on it now plus what this process holds),
               the smallest over ranks
    estimate = parameter, gradient and optimizer shards + parameters gathered for compute + loss workspace
               + for each layer: its activations (not checkpointed) or its input (checkpointed)
               + one layer's activations (the one being recomputed in backward)

The activation figure per layer and token is deliberately the eager (uncompiled) one,
``compute bytes x (9 hidden + 3 kv + 4 intermediate)`` for a Llama-style block (norm inputs in fp32,
q/k/v before and after RoPE, attention output, the MLP's gate, up, activation and product);
``torch.compile`` saves less (measured on H200, Llama-3.2-1B shape, 16K tokens: 71 KB per token and layer
against the formula's 105 KB), so the estimate errs towards checkpointing: the estimated peaks were 28-48%
above the measured peak allocations (benchmarks/README.md: Llama-3.2-1B and Llama-3.1-8B shapes, full and
LoRA). Models whose config lacks ``hidden_size`` / ``intermediate_size`` get every layer checkpointed, as does
any run off CUDA (no GPU memory to budget). The choice is made once from the smallest budget over ranks, so every rank checkpoints the same
layers, and it is logged with its numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from shardtune.observability.memory import GB  # the unit of every memory figure shardtune prints
from shardtune.policies.quantization import is_quantized
from shardtune.utils import precision as P


@dataclass(frozen=True)
class StepMemory:
    """Estimated bytes of one training step on one rank, split into what checkpointing can and cannot change."""

    fixed: int              # parameter/gradient/optimizer shards, gathered parameters, loss workspace
    layer_activations: int  # what one decoder layer keeps for backward when it is not checkpointed
    layer_input: int        # what a checkpointed layer keeps (its input hidden states)
    n_layers: int

    def peak(self, checkpointed: int) -> int:
        """The estimated peak with ``checkpointed`` of the layers checkpointed."""
        kept = self.n_layers - checkpointed
        recompute = self.layer_activations if checkpointed else 0
        return self.fixed + kept * self.layer_activations + checkpointed * self.layer_input + recompute


@dataclass(frozen=True)
class CheckpointPlan:
    """Which decoder layers (indices) are checkpointed, and why, in words for the log."""

    layers: List[int]
    n_layers: int
    reason: str


def fewest_checkpointed(mem: StepMemory, budget: int) -> int:
    """The smallest number of checkpointed layers whose estimated peak fits ``budget`` (all layers if none does)."""
    for k in range(mem.n_layers + 1):
        if mem.peak(k) <= budget:
            return k
    return mem.n_layers


def spread(k: int, n: int) -> List[int]:
    """``k`` of ``n`` layer indices spread evenly (k = n: all of them)."""
    return sorted({(i * n) // k for i in range(k)}) if k else []


def estimate_step_memory(model: nn.Module, layers: List[nn.Module], precision: str, tokens: int, shard_size: int,
                         reshard_after_forward: bool = True, frozen_in_compute_dtype: bool = False
                         ) -> Optional[StepMemory]:
    """The step's memory on one rank for a micro-batch of ``tokens`` tokens, or None for an unknown block shape.

    ``shard_size``: ranks that share one copy of the parameters (1 without sharding). States per trainable
    parameter: parameter, gradient and AdamW's two moments, in the master dtype. Frozen parameters are stored
    in the compute dtype under PEFT (``frozen_in_compute_dtype``, as fsdp_utils.UnitPlacer stores them), quantized
    ones as they are.
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

    from shardtune.utils.loss import CHUNK_BYTES

    # Chunked cross-entropy: up to three chunks of fp32 logits (logits, softmax, gradient; all rows at once when
    # they fit in one chunk) plus the hidden states and their gradient in fp32.
    loss = min(3 * CHUNK_BYTES, 3 * tokens * vocab * 4) + tokens * h * 8
    per_token = compute * (9 * h + 3 * kv + 4 * inter)
    return StepMemory(fixed=states + gathered + loss, layer_activations=tokens * per_token,
                      layer_input=tokens * h * compute, n_layers=len(layers))


def device_budget(device: torch.device, fraction: float) -> Optional[int]:
    """``fraction`` of this GPU's memory, capped by what is free on it now; None off CUDA. Under a process
    group, the smallest over ranks, so that every rank makes the same choice."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    # What this process holds already (a quantized model is loaded onto the GPU) is counted by the estimate.
    usable = free + torch.cuda.memory_reserved(device)
    from shardtune.utils import distributed

    return distributed.agree(min(int(fraction * total), usable), device, op="min")


def plan_checkpointing(model: nn.Module, layers: List[nn.Module], run, precision: str, device: torch.device,
                       shard_size: int, reshard_after_forward: bool = True) -> CheckpointPlan:
    """The decoder layers to checkpoint under ``run``'s fsdp_config (see the module docstring)."""
    f, t = run.fsdp, run.train
    n = len(layers)
    if not f.fsdp_activation_checkpointing:
        return CheckpointPlan([], n, "off")
    if f.ac_every_n_layers >= 1:
        every = f.ac_every_n_layers
        chosen = list(range(0, n, every))
        return CheckpointPlan(chosen, n, f"--fsdp_config.ac_every_n_layers {every}")
    budget = device_budget(device, f.ac_memory_fraction)
    if budget is None:
        return CheckpointPlan(list(range(n)), n, f"auto, no GPU memory to budget on {device.type}")
    tokens = t.batch_size_training * t.context_length  # packing: exact; padding: samples are cut to context_length
    mem = estimate_step_memory(model, layers, precision, tokens, shard_size, reshard_after_forward,
                               frozen_in_compute_dtype=t.use_peft)
    if mem is None:
        return CheckpointPlan(list(range(n)), n, "auto, no memory estimate for a "
                                                 f"{type(_text_config(model)).__name__}")
    k = fewest_checkpointed(mem, budget)
    fits = mem.peak(k) <= budget
    why = (f"auto: estimated peak {mem.peak(k) / GB:.1f} GB {'within' if fits else 'OVER'} the budget "
           f"{budget / GB:.1f} GB (--fsdp_config.ac_memory_fraction {f.ac_memory_fraction} of the GPU, capped by "
           f"free memory); no checkpointing would need {mem.peak(0) / GB:.1f} GB, every layer "
           f"{mem.peak(n) / GB:.1f} GB")
    return CheckpointPlan(spread(k, n), n, why)


def describe_plan(plan: CheckpointPlan) -> str:
    if plan.reason == "off":
        return "off"
    return f"on for {len(plan.layers)} of {plan.n_layers} decoder layers ({plan.reason})"


def _text_config(model: nn.Module):
    config = getattr(getattr(model, "base_model", model), "config", None)  # CausalLMWithLoss: below any PEFT wrapper
    return getattr(config, "text_config", None) or config
