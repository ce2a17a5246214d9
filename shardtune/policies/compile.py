"""Per-decoder-layer ``torch.compile`` (``--torch_compile``).

Each decoder layer is compiled on its own (``module.compile()``), not the whole model: every layer runs
the same code, so one graph serves all of them; graph breaks stay local; and activation checkpointing
and FSDP2 wrap the compiled layers exactly as they wrap eager ones (Dynamo runs FSDP's hooks eagerly).
State-dict keys do not change (``module.compile()`` adds no ``_orig_mod`` prefix), so checkpoints and
exports are the same with and without it. The gain comes from fusing the norms, rotary embedding,
residual adds and SiLU-gating around the matmuls, and from compiling FlexAttention into the layer.
"""
from __future__ import annotations

from torch import nn

from shardtune.policies.wrapping import fsdp_units
from shardtune.utils.logging import log


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many were compiled."""
    layers = fsdp_units(model)
    for layer in layers:
        layer.compile()
    log(f"--> torch.compile: {len(layers)} decoder layers compiled one by one (the first steps include compile "
        "time; --torch_compile False turns it off)")
    return len(layers)
