"""Per-decoder-layer ``torch.compile`` (``--torch_compile``).

Each decoder layer is compiled on its own (``module.compile()``), not the whole model: every layer runs
the same code, so one graph serves all of them; graph breaks stay local; and activation checkpointing
and FSDP2 wrap the compiled layers exactly as they wrap eager ones (Dynamo runs FSDP's hooks eagerly).
State-dict keys do not change (``module.compile()`` adds no ``_orig_mod`` prefix), so checkpoints and
exports are the same with and without it. The gain comes from fusing the norms, rotary embedding,
residual adds and SiLU-gating around the matmuls, and from compiling FlexAttention into the layer.

Compiled code is kept on disk between runs: Inductor's FX graph cache and AOTAutograd's cache (both on by
default) live under ``TORCHINDUCTOR_CACHE_DIR``, which defaults to a folder in /tmp that a cluster job's node
often wipes. Unless the user set it, it is ``~/.cache/shardtune/inductor`` (``$XDG_CACHE_HOME`` respected), so a
second run of the same command loads the layer's kernels instead of compiling them again (Dynamo still traces the
layer, which takes seconds, not the minutes of a cold compile).
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from shardtune.policies.wrapping import fsdp_units
from shardtune.utils.logging import log


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many were compiled."""
    layers = fsdp_units(model)
    cache = use_persistent_compile_cache()
    for layer in layers:
        layer.compile()
    log(f"--> torch.compile: {len(layers)} decoder layers compiled one by one, identical layers share one graph "
        f"(the first step includes compile time; compiled code is cached in {cache}; --torch_compile False turns "
        "it off)")
    return len(layers)


def use_persistent_compile_cache() -> str:
    """The folder Inductor caches compiled code in: the user's TORCHINDUCTOR_CACHE_DIR, else a stable per-user one
    (set for this process before anything is compiled)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "shardtune" / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
