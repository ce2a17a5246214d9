"""Wrapping policy for FSDP2: which modules become their own FSDP unit.

Every repeated decoder block (``models/loading.py: decoder_layers``: found from the model's
``_no_split_modules``, so it is not tied to Llama) is one unit, and the root (the
``CausalLMWithLoss`` wrapper) is the last unit, holding what is left: embeddings, final norm, output
layer. A unit's parameters are all-gathered together before its forward and freed after it, so peak
memory is about one layer's full parameters plus the shards of everything.

PEFT needs no special policy with FSDP2 (the reference wrapped every trainable leaf separately
because FSDP1's flat parameters need uniform ``requires_grad``): adapters are sharded with the layer
they live in; frozen and trainable parameters may share a unit.
"""
from __future__ import annotations

from typing import List

from torch import nn

from shardtune.models.loading import decoder_layers


def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """The modules to shard before the root, innermost first (here: the decoder layers in order)."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: found no decoder layers to shard (no _no_split_modules and no "
                         f"nn.ModuleList)")
    return layers


def describe_units(model: nn.Module) -> str:
    layers = fsdp_units(model)
    names = sorted({type(m).__name__ for m in layers})
    return f"{len(layers)} x {'/'.join(names)} + root {type(model).__name__}"
