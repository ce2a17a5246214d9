"""Every random stream a training process draws from: seeding, capturing and restoring.

Checkpoints store :func:`rng_state` per rank so that a resumed run draws the same dropout masks and
data-loader seeds as the uninterrupted one. Evaluation runs inside :func:`preserved_rng`, so that it
never moves the training streams (otherwise a checkpoint taken after evaluation would not continue
like the run that was not stopped).
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def rng_state(device: torch.device) -> dict:
    """Every RNG this process draws from. Stored as tensors and lists (loadable with weights_only)."""
    py = random.getstate()
    state = {"python": [py[0], list(py[1]), py[2]], "torch": torch.get_rng_state(), "cuda": None, "numpy": None}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without moving any random stream (evaluation draws data-loader seeds, for one)."""
    saved = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(saved, device)
