"""Pieces shared by the data set builders."""
from __future__ import annotations

from shardtune.utils.config_utils import ConfigError
from shardtune.utils.loss import IGNORE_INDEX


def data_error(flag: str, path: str, source: str, problem: str = "not found") -> ConfigError:
    """One line naming the flag that sets the path and where the data set comes from."""
    if problem == "not found":
        return ConfigError(f"{flag}: file not found: {path} (set {flag} to your copy of {source})")
    return ConfigError(f"{flag}: {path} {problem} {source}")


def tokenize_prompt_and_target(tokenizer, prompt: str, target: str) -> dict:
    """[bos] + prompt + target + [eos], with labels only on target + eos."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer.encode(prompt, add_special_tokens=False)
    target_ids = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + target_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }
