"""wandb_config: passed to ``wandb.init`` as keyword arguments."""
from dataclasses import dataclass
from typing import List, Optional

from shardtune.configs._field import doc


@dataclass
class wandb_config:
    """Weights & Biases settings (with --use_wandb), passed to wandb.init."""

    NEEDS = ("use_wandb",)

    project: str = doc("shardtune", "W&B project (the reference's default was 'llama_cookbook').")
    entity: Optional[str] = doc(None, "W&B team or user.")
    job_type: Optional[str] = doc(None, "W&B job type.")
    tags: Optional[List[str]] = doc(None, "W&B tags, e.g. a,b.")
    group: Optional[str] = doc(None, "W&B group.")
    notes: Optional[str] = doc(None, "W&B notes.")
    mode: Optional[str] = doc(None, "'online' | 'offline' | 'disabled'.", choices=("online", "offline", "disabled"))
