"""Activation checkpointing: each decoder layer keeps only its input during forward and recomputes its
activations in backward (non-reentrant ``torch.utils.checkpoint``).

Applied exactly once, per decoder layer, before sharding (the reference applied both Hugging Face's
``gradient_checkpointing_enable`` and the FSDP wrapper, so Llama layers were checkpointed twice).
Non-reentrant checkpointing needs no ``enable_input_require_grads`` trick for frozen embeddings, and
the wrapper strips its ``_checkpoint_wrapped_module`` prefix from state-dict keys, so checkpoints and
exported models are unaffected.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, CheckpointWrapper,
                                                                         checkpoint_wrapper)


def apply_activation_checkpointing(model: nn.Module, layers: Iterable[nn.Module]) -> list:
    """Replace every module in ``layers`` (inside ``model``) by a checkpointed wrapper around it.

    Returns the modules now standing where the layers were (the wrappers), which are the ones to shard.
    Layers already wrapped are left alone, so calling it twice does not nest checkpoints.
    """
    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("Hugging Face gradient checkpointing is already on; checkpointing twice only costs time")
    targets = {id(m) for m in layers}
    wrapped = []
    for parent in list(model.modules()):
        if isinstance(parent, CheckpointWrapper):
            continue
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                wrapper = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                parent.register_module(name, wrapper)
                wrapped.append(wrapper)
            elif isinstance(child, CheckpointWrapper) and id(child._checkpoint_wrapped_module) in targets:
                wrapped.append(child)  # already checkpointed
    return wrapped


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, CheckpointWrapper)


def checkpointed_fraction(model: nn.Module) -> float:
    """Share of the decoder layers whose forward runs again in backward (0.0 without checkpointing)."""
    from shardtune.policies.wrapping import fsdp_units

    wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
    return wrapped / max(1, len(fsdp_units(model)))
