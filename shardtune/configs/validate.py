"""Validation of values and combinations: all of it runs before anything is loaded or written."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from shardtune import configs as C
from shardtune.configs._field import FALSE_WORDS, TRUE_WORDS
from shardtune.configs.quantization import COMPUTE_DTYPES, PEFT_METHODS, QUANT_STORAGE, dtype_name
from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Validation of values and combinations: all of it runs before anything is loaded.
# ---------------------------------------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16_mixed", "fp16_mixed", "bf16_pure")



ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flex_attention", "eager", "flash_attention_2")



def _flag(config_name: str, field_name: str) -> str:
    """How an error names a field: plain for train_config (its fields win plain keys), qualified otherwise."""
    return f"--{field_name}" if config_name == "train_config" else f"--{config_name}.{field_name}"



def in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval``, written as in maths: '[0, 1)', '(0, inf)'."""
    text = interval.strip()
    low, high = (float(x) for x in text[1:-1].split(","))
    above = value >= low if text[0] == "[" else value > low
    below = value <= high if text[-1] == "]" else value < high
    return above and below



def check_ranges(run: RunConfigs) -> None:
    """Every number must be finite and inside its field's ``valid`` interval (declared next to the field)."""
    for name, cfg in run.by_name().items():
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{_flag(name, f.name)}: must be a finite number, got {value}")
            interval = f.metadata.get("valid")
            if interval and not in_interval(value, interval):
                raise ConfigError(f"{_flag(name, f.name)}: must be in {interval}, got {value}")



def check_retired_fields(run: RunConfigs) -> None:
    """Reference fields shardtune keeps only so that old commands parse (configs/_field.py): an unsupported
    one that is set stops the run with one line; a deprecated one that is set prints one warning line."""
    from shardtune.utils.logging import warn

    for name, cfg in run.by_name().items():
        defaults = type(cfg)()
        for f in fields(cfg):
            if getattr(cfg, f.name) == getattr(defaults, f.name):
                continue
            if f.metadata.get("unsupported"):
                raise ConfigError(f"{_flag(name, f.name)} is not supported: {f.metadata['unsupported']}")
            if f.metadata.get("deprecated"):
                warn(f"{_flag(name, f.name)} is deprecated and has no effect: {f.metadata['deprecated']}")



def check_output_dir(path_text: str) -> None:
    """The output folder must be creatable: checked without creating anything."""
    if not path_text.strip():
        raise ConfigError("--output_dir: empty; give a folder for the model, checkpoints and metrics")
    path = Path(path_text).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir: {path_text} is a file, not a folder; give a folder path")
    existing = path
    while not existing.exists():  # the nearest existing ancestor must be a writable folder
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output_dir: cannot create {path_text}: {existing} is a file")
    try:  # a probe folder, removed at once: permissions alone miss read-only mounts and root's rights
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"--output_dir: cannot create {path_text}: {existing} is not writable "
                          f"({exc.strerror}); give a writable folder") from None



# Options that only act on a sharded run, with their defaults: set without --enable_fsdp they would be ignored.
FSDP_ONLY = ("fsdp_cpu_offload", "hsdp", "sharding_group_size", "replica_group_size", "sharding_strategy",
             "keep_gathered_layers")



def validate(run: RunConfigs) -> None:
    t, f = run.train, run.fsdp

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    check_ranges(run)
    check_retired_fields(run)
    need(t.dataset in run.dataset_configs,
         f"--dataset: unknown data set {t.dataset!r}; valid: {', '.join(run.dataset_configs)}")
    need(t.peft_method in run.peft_configs,
         f"--peft_method: unknown method {t.peft_method!r}; valid: {', '.join(run.peft_configs)}")
    need(t.batching_strategy in ("packing", "padding"),
         f"--batching_strategy: expected 'packing' or 'padding', got {t.batching_strategy!r}")
    need(t.precision in PRECISIONS, f"--precision: expected one of {' | '.join(PRECISIONS)}, got {t.precision!r}")
    need(t.attn_implementation in ATTN_IMPLEMENTATIONS, f"--attn_implementation: expected one of "
         f"{' | '.join(ATTN_IMPLEMENTATIONS)}, got {t.attn_implementation!r}")
    need(str(t.torch_compile).lower() in ("auto",) + tuple(TRUE_WORDS | FALSE_WORDS),
         f"--torch_compile: expected auto, True or False, got {t.torch_compile!r}")
    need(not t.gradient_clipping or t.gradient_clipping_threshold > 0,
         f"--gradient_clipping_threshold: must be > 0 with --gradient_clipping, got {t.gradient_clipping_threshold}")
    need(t.divergence_factor == 0 or t.divergence_factor > 1,
         f"--divergence_factor: must be 0 (off) or greater than 1, got {t.divergence_factor:g}")
    check_output_dir(t.output_dir)
    need(not (t.flop_counter and t.use_profiler),
         "--flop_counter and --use_profiler cannot be combined: the profiler's overhead would distort the count; "
         "run them separately")
    need(not (t.flop_counter and 0 < t.max_train_step <= t.flop_counter_start),
         f"--flop_counter: --max_train_step ({t.max_train_step}) must be greater than --flop_counter_start "
         f"({t.flop_counter_start}) so that a step is left to count")
    need(not t.from_peft_checkpoint or t.use_peft, "--from_peft_checkpoint needs --use_peft")
    need(not (t.overwrite_output_dir and t.resume_from),
         "--overwrite_output_dir deletes the earlier run's checkpoints, --resume_from continues from them: pick one")
    need(not (t.freeze_layers and t.use_peft),
         "--freeze_layers has no effect with --use_peft (PEFT already freezes the base model): drop one of them")
    need(t.quantization in (None, "4bit", "8bit"),
         f"--quantization: expected '4bit' or '8bit', got {t.quantization!r}")
    need(not (t.quantization == "8bit" and t.enable_fsdp),
         "--quantization 8bit cannot be combined with --enable_fsdp (bitsandbytes int8 weights keep row-wise "
         "statistics beside int8 storage, which FSDP cannot shard); use --quantization 4bit")
    if t.quantization:
        need(t.use_peft, f"--quantization {t.quantization} needs --use_peft: quantized base weights are frozen, "
                         "only adapters train on them (--use_peft --peft_method lora)")
        need(t.peft_method in PEFT_METHODS, f"--quantization {t.quantization} with --peft_method {t.peft_method}: "
                                            f"quantized training is supported with {', '.join(PEFT_METHODS)}")
    need(not t.low_cpu_fsdp or t.enable_fsdp, "--low_cpu_fsdp needs --enable_fsdp")
    if not t.enable_fsdp:
        defaults = C.fsdp_config()
        for name in FSDP_ONLY:
            need(getattr(f, name) == getattr(defaults, name),
                 f"--fsdp_config.{name} has no effect without --enable_fsdp: add --enable_fsdp (under torchrun) "
                 "or drop it")
    need(f.optimizer.lower() in ("adamw", "anyprecision"),
         f"--fsdp_config.optimizer: expected 'AdamW' or 'anyprecision', got {f.optimizer!r}")
    need(not (f.pure_bf16 and (t.use_fp16 or f.use_fp16)),
         "--fsdp_config.pure_bf16 and --use_fp16 cannot be combined: pick one precision")
    need(not (t.precision not in ("auto",) and (f.pure_bf16 or t.use_fp16 or f.use_fp16)),
         f"--precision {t.precision} cannot be combined with --use_fp16 / --fsdp_config.pure_bf16: use one of them")
    if f.hsdp:
        need(f.sharding_strategy is C.ShardingStrategy.HYBRID_SHARD,
             "--fsdp_config.hsdp needs --fsdp_config.sharding_strategy HYBRID_SHARD")
        need(f.sharding_group_size >= 1 and f.replica_group_size >= 1,
             "--fsdp_config.hsdp needs --sharding_group_size S and --replica_group_size R (S x R = world size)")
    lora = run.peft_configs["lora"]
    need(lora.bias in ("none", "all", "lora_only"),
         f"--lora_config.bias: expected 'none', 'all' or 'lora_only', got {lora.bias!r}")
    need(bool(lora.target_modules), "--lora_config.target_modules: give at least one module name")
    q = run.quantization
    need(q.quant_type in ("fp4", "nf4"), f"--quantization_config.quant_type: expected 'fp4' or 'nf4', got "
                                         f"{q.quant_type!r}")
    need(q.compute_dtype in COMPUTE_DTYPES, f"--quantization_config.compute_dtype: expected one of "
         f"{' | '.join(map(dtype_name, COMPUTE_DTYPES))}, got {dtype_name(q.compute_dtype)}")
    need(q.quant_storage in QUANT_STORAGE, f"--quantization_config.quant_storage: expected one of "
         f"{' | '.join(map(dtype_name, QUANT_STORAGE))}, got {dtype_name(q.quant_storage)}")
    need(not (t.quantization == "4bit" and t.enable_fsdp and q.quant_storage == torch.uint8),
         "--quantization_config.quant_storage uint8 cannot be sharded (FSDP splits float tensors only): use "
         "bfloat16 (the default), the dtype FSDP gathers in")
