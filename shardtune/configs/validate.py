"""Validation of values and combinations: all of it runs before anything is loaded or written.

Most rules are declarations next to each field (configs/_field.py): its interval, its choices, what it needs to
take effect. :func:`check_declarations` reads them for every field, so that a field added later is checked like
the others. :func:`validate` adds the combinations no single field can declare (two precisions at once, ...).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from shardtune.configs.needs import as_text, describe_unmet, flag, unmet_clause
from shardtune.configs.quantization import PEFT_METHODS
from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.utils.logging import warn


def in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval``, written as in maths: '[0, 1)', '(0, inf)'."""
    text = interval.strip()
    low, high = (float(x) for x in text[1:-1].split(","))
    above = value >= low if text[0] == "[" else value > low
    below = value <= high if text[-1] == "]" else value < high
    return above and below


def _check_value(name: str, f, value) -> None:
    """The field's declared interval (numbers: finite, inside it) and choices (text)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag(name, f.name)}: must be a finite number, got {value}")
        interval = f.metadata.get("valid")
        if interval and not in_interval(value, interval):
            raise ConfigError(f"{flag(name, f.name)}: must be in {interval}, got {value}")
    choices = f.metadata.get("choices")
    if choices and value is not None and as_text(value).lower() not in {c.lower() for c in choices}:
        raise ConfigError(f"{flag(name, f.name)}: expected one of {' | '.join(choices)}, got {as_text(value)!r}")


def check_declarations(run: RunConfigs) -> None:
    """Every field against what is declared next to it: first each value (interval, choices, refused reference
    fields), then, for the fields the user gave, whether they take effect at all (``needs``)."""
    for name, cfg in run.by_name().items():
        defaults = type(cfg)()
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            _check_value(name, f, value)
            if value == getattr(defaults, f.name):
                continue
            if f.metadata.get("unsupported"):
                raise ConfigError(f"{flag(name, f.name)} is not supported: {f.metadata['unsupported']}")
            if f.metadata.get("deprecated"):
                warn(f"{flag(name, f.name)} is deprecated and has no effect: {f.metadata['deprecated']}")
    for name, field_name in sorted(run.given, key=lambda key: _order(run, key)):
        cfg = run.by_name()[name]
        f = next(f for f in fields(cfg) if f.name == field_name)
        clause = unmet_clause(run, cfg, f)
        if clause is not None:
            raise ConfigError(describe_unmet(run, name, field_name, clause))


def _order(run: RunConfigs, key) -> tuple:
    """Report in --help order (configs, then fields), whatever order the flags were typed in."""
    names = list(run.by_name())
    cfg = run.by_name()[key[0]]
    return names.index(key[0]), [f.name for f in fields(cfg)].index(key[1])


def check_folder(flag_name: str, path_text: str, what: str) -> None:
    """A folder shardtune will create and write into must be creatable: checked without creating anything."""
    if not path_text.strip():
        raise ConfigError(f"{flag_name}: empty; give a folder for {what}")
    path = Path(path_text).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag_name}: {path_text} is a file, not a folder; give a folder path")
    existing = path
    while not existing.exists():  # the nearest existing ancestor must be a writable folder
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag_name}: cannot create {path_text}: {existing} is a file")
    try:  # a probe folder, removed at once: permissions alone miss read-only mounts and root's rights
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"{flag_name}: cannot create {path_text}: {existing} is not writable "
                          f"({exc.strerror}); give a writable folder") from None


def validate(run: RunConfigs) -> None:
    """Every check that needs no file, model or process: declarations first, then the combinations."""
    t, f, q = run.train, run.fsdp, run.quantization

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(t.dataset in run.dataset_configs,
         f"--dataset: unknown data set {t.dataset!r}; valid: {', '.join(run.dataset_configs)}")
    need(t.peft_method in run.peft_configs,
         f"--peft_method: unknown method {t.peft_method!r}; valid: {', '.join(run.peft_configs)}")
    check_declarations(run)
    need(t.divergence_factor == 0 or t.divergence_factor > 1,
         f"--divergence_factor: must be 0 (off) or greater than 1, got {t.divergence_factor:g}")
    need(bool(str(t.model_name).strip()), "--model_name: empty; give a Hugging Face hub id, a model folder or a "
                                          ".gguf file (or drop it for the bundled demo model)")
    need(t.tokenizer_name is None or bool(t.tokenizer_name.strip()),
         "--tokenizer_name: empty; give a hub id or folder, or drop it to use --model_name's tokenizer")
    check_folder("--output_dir", t.output_dir, "the model, checkpoints and metrics")
    if t.dist_checkpoint_root_folder:
        check_folder("--dist_checkpoint_root_folder", t.dist_checkpoint_root_folder, "the checkpoints")
    if t.use_profiler and t.profiler_dir:
        check_folder("--profiler_dir", t.profiler_dir, "the profiler traces")
    folder = t.dist_checkpoint_folder.strip()
    need(folder not in ("", ".", "..") and "/" not in folder,
         f"--dist_checkpoint_folder: {t.dist_checkpoint_folder!r} is not a folder name; give a plain name such as "
         "fine-tuned (the root is --dist_checkpoint_root_folder)")
    need(not (t.flop_counter and t.use_profiler),
         "--flop_counter and --use_profiler cannot be combined: the profiler's overhead would distort the count; "
         "run them separately")
    need(not (t.flop_counter and 0 < t.max_train_step <= t.flop_counter_start),
         f"--flop_counter: --max_train_step ({t.max_train_step}) must be greater than --flop_counter_start "
         f"({t.flop_counter_start}) so that a step is left to count")
    need(not (t.overwrite_output_dir and t.resume_from),
         "--overwrite_output_dir deletes the earlier run's checkpoints, --resume_from continues from them: pick one")
    need(not (t.quantization == "8bit" and t.enable_fsdp),
         "--quantization 8bit cannot be combined with --enable_fsdp (bitsandbytes int8 weights keep row-wise "
         "statistics beside int8 storage, which FSDP cannot shard); use --quantization 4bit")
    if t.quantization:
        need(t.use_peft, f"--quantization {t.quantization} needs --use_peft: quantized base weights are frozen, "
                         "only adapters train on them (--use_peft --peft_method lora)")
        need(t.peft_method in PEFT_METHODS, f"--quantization {t.quantization} with --peft_method {t.peft_method}: "
                                            f"quantized training is supported with {', '.join(PEFT_METHODS)}")
    need(not (f.pure_bf16 and (t.use_fp16 or f.use_fp16)),
         "--fsdp_config.pure_bf16 and --use_fp16 cannot be combined: pick one precision")
    need(not (t.precision not in ("auto",) and (f.pure_bf16 or t.use_fp16 or f.use_fp16)),
         f"--precision {t.precision} cannot be combined with --use_fp16 / --fsdp_config.pure_bf16: use one of them")
    if f.hsdp:
        need(f.sharding_group_size >= 1 and f.replica_group_size >= 1,
             "--fsdp_config.hsdp needs --sharding_group_size S and --replica_group_size R (S x R = world size)")
    if t.use_peft:
        peft = run.peft
        need(not getattr(peft, "inference_mode", False), f"--{type(peft).__name__}.inference_mode True builds a frozen "
             "adapter: training would change nothing; drop it (it is for inference only)")
        if t.peft_method == "lora":
            need(bool(peft.target_modules), "--lora_config.target_modules: give at least one module name")
    need(not (t.quantization == "4bit" and t.enable_fsdp and q.quant_storage == torch.uint8),
         "--quantization_config.quant_storage uint8 cannot be sharded (FSDP splits float tensors only): use "
         "bfloat16 (the default), the dtype FSDP gathers in")
