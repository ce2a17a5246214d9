"""Command line and config file -> typed, validated configs.

Rules (``--help`` prints them short; utils/config_help.py):

* ``--field value`` sets a field by its plain name. When several configs have a field of that name, the
  **first** config in this order gets it: train_config, fsdp_config, the active PEFT config
  (``peft_method``), the other PEFT configs, the active dataset config (``dataset``), the other dataset
  configs, wandb_config, quantization_config. So ``--use_fp16`` sets train_config.use_fp16 (whose fp16
  mode also applies under FSDP) and ``--r 16`` sets lora_config.r.
* ``--config_name.field value`` sets exactly that config's field, e.g. ``--fsdp_config.use_fp16``,
  ``--alpaca_dataset.data_path``. ``--train_config.lr`` works too.
* Values are converted to the field's type: bools from True/False/1/0/yes/no, enums from their names
  (``HYBRID_SHARD`` or the reference's ``StateDictType.FULL_STATE_DICT``), lists from ``a,b`` or a
  list literal, dtypes from ``bfloat16``.
* ``--config run.yaml`` reads the same keys (flat or nested by config name) from a YAML or JSON file;
  flags on the command line override it.

Every error is a :class:`ConfigError` with one line that names the flag and what would be valid.
"""
from __future__ import annotations

import difflib
import enum
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List

import torch

from shardtune import configs as C


class ConfigError(ValueError):
    """A user error in flags or config files. The message is one line meant for the terminal."""


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (or its type when it has none): what a one-line error quotes."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class RunConfigs:
    """Every config of one run. ``peft`` and ``dataset`` are the ones selected by train_config."""

    train: C.train_config = field(default_factory=C.train_config)
    fsdp: C.fsdp_config = field(default_factory=C.fsdp_config)
    peft_configs: Dict[str, Any] = field(default_factory=lambda: {k: v() for k, v in C.PEFT_CONFIGS.items()})
    dataset_configs: Dict[str, Any] = field(default_factory=lambda: {k: v() for k, v in C.DATASET_CONFIGS.items()})
    wandb: C.wandb_config = field(default_factory=C.wandb_config)
    quantization: C.quantization_config = field(default_factory=C.quantization_config)
    demo_preset: bool = False  # True when no --model_name was given (configs/presets.py)

    @property
    def peft(self):
        return self.peft_configs[self.train.peft_method]

    @property
    def dataset(self):
        return self.dataset_configs[self.train.dataset]

    def all_configs(self) -> List[Any]:
        """Every config in the plain-key priority order of the module docstring."""
        peft_names = [self.train.peft_method] if self.train.peft_method in self.peft_configs else []
        peft_names += [n for n in self.peft_configs if n not in peft_names]
        data_names = [self.train.dataset] if self.train.dataset in self.dataset_configs else []
        data_names += [n for n in self.dataset_configs if n not in data_names]
        return ([self.train, self.fsdp] + [self.peft_configs[n] for n in peft_names]
                + [self.dataset_configs[n] for n in data_names] + [self.wandb, self.quantization])

    def by_name(self) -> Dict[str, Any]:
        return {type(c).__name__: c for c in self.all_configs()}

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """The resolved run as plain data: train, fsdp, the active PEFT and dataset configs, trackers."""
        chosen = [self.train, self.fsdp, self.peft, self.dataset, self.wandb, self.quantization]
        return {type(c).__name__: {f.name: _plain(getattr(c, f.name)) for f in fields(c)} for c in chosen}


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Type coercion
# ---------------------------------------------------------------------------------------------
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "uint8": torch.uint8}  # uint8: bitsandbytes' packed 4-bit storage (quantization_config.quant_storage)


def _type_name(tp) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + " | ".join(m.name for m in tp)
    if tp is torch.dtype:
        return "a dtype (bfloat16 | float16 | float32)"
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or None"
    if origin in (list, List):
        return "a list (a,b or [a, b])"
    return {bool: "a bool (True/False)", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, flag: str) -> Any:
    """Convert ``value`` (as fire or YAML parsed it) to the annotated type ``tp``."""

    def bad() -> ConfigError:
        return ConfigError(f"{flag}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return coerce(value, inner, flag)
    if origin in (list, List):
        (item_type,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                text = text[1:-1] if text.endswith("]") else text[1:]
            items = [p.strip().strip("'\"") for p in text.split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return [coerce(v, item_type, flag) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise bad() from None
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if tp is str:
        if isinstance(value, (list, tuple)):  # fire turns a,b into a tuple
            return ",".join(str(v) for v in value)
        return str(value)
    if tp is torch.dtype:
        if isinstance(value, torch.dtype):
            return value
        key = str(value).strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
        raise bad()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, enum.Enum):  # ours, or torch's FSDP1 enum set in a Python file
            value = value.name
        key = str(value).strip().split(".")[-1].upper()
        if key in tp.__members__:
            return tp[key]
        raise bad()
    return value


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------
def _field_types(cfg) -> Dict[str, Any]:
    hints = typing.get_type_hints(type(cfg))
    return {f.name: hints[f.name] for f in fields(cfg)}


def _all_flag_names(run: RunConfigs) -> List[str]:
    names = set()
    for name, cfg in run.by_name().items():
        for f in fields(cfg):
            names.add(f.name)
            names.add(f"{name}.{f.name}")
    return sorted(names)


def _unknown(key: str, run: RunConfigs, hint: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, _all_flag_names(run), n=3, cutoff=0.6)
    suggestion = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
    return ConfigError(f"unknown flag --{key}{suggestion}{hint} (see --help)")


def _flatten_file(data: Dict[str, Any], run: RunConfigs) -> Dict[str, Any]:
    """A config file may be flat ({lr: 1e-4}) or nested by config name ({fsdp_config: {...}})."""
    flat: Dict[str, Any] = {}
    names = run.by_name()
    for key, value in data.items():
        if key in names and isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def load_config_file(path: str, run: RunConfigs) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {path} (give a YAML or JSON file of config keys)")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"--config: cannot parse {path}: {first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of config keys, not {type(data).__name__}")
    return _flatten_file(data, run)


def parse_cli(kwargs: Dict[str, Any]) -> RunConfigs:
    """Build validated configs from fire's keyword arguments (and ``--config FILE``)."""
    run = RunConfigs()
    kwargs = dict(kwargs)
    file_path = kwargs.pop("config", None)
    merged: Dict[str, Any] = {}
    if file_path is not None:
        merged.update(load_config_file(str(file_path), run))
    merged.update(kwargs)  # command line wins over the file
    run.demo_preset = not any(k in merged for k in ("model_name", "train_config.model_name"))
    if run.demo_preset:  # no model given: the embedded demo (see configs/presets.py)
        from shardtune.configs.presets import DEMO_PRESET

        given = {k.rsplit(".", 1)[-1] for k in merged}
        merged = {**{k: v for k, v in DEMO_PRESET.items() if k.rsplit(".", 1)[-1] not in given}, **merged}

    # train_config.peft_method and .dataset decide the plain-key priority: apply them first.
    for selector in ("peft_method", "dataset"):
        for key in (selector, f"train_config.{selector}"):
            if key in merged:
                _set(run, key, merged[key])
    for key, value in merged.items():
        _set(run, key, value)
    validate(run)
    return run


def _set(run: RunConfigs, key: str, value: Any) -> None:
    key = key.replace("-", "_")
    names = run.by_name()
    if "." in key:
        prefix, _, name = key.partition(".")
        if prefix not in names:
            raise _unknown(key, run, f"; '{prefix}' is not a config (configs: {', '.join(names)})")
        if "." in name:
            raise _unknown(key, run, "; use one dot: --config_name.field")
        cfg = names[prefix]
        types = _field_types(cfg)
        if name not in types:
            raise _unknown(key, run)
        setattr(cfg, name, coerce(value, types[name], f"--{key}"))
        return
    for cfg in run.all_configs():
        types = _field_types(cfg)
        if key in types:
            setattr(cfg, key, coerce(value, types[key], f"--{key}"))
            return
    raise _unknown(key, run)


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
    from shardtune.observability.logging import warn

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
    need(str(t.torch_compile).lower() in ("auto",) + tuple(_TRUE | _FALSE),
         f"--torch_compile: expected auto, True or False, got {t.torch_compile!r}")
    need(not t.gradient_clipping or t.gradient_clipping_threshold > 0,
         f"--gradient_clipping_threshold: must be > 0 with --gradient_clipping, got {t.gradient_clipping_threshold}")
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
        from shardtune.policies.quantization import PEFT_METHODS

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
    from shardtune.policies.quantization import COMPUTE_DTYPES, QUANT_STORAGE, dtype_name

    need(q.compute_dtype in COMPUTE_DTYPES, f"--quantization_config.compute_dtype: expected one of "
         f"{' | '.join(map(dtype_name, COMPUTE_DTYPES))}, got {dtype_name(q.compute_dtype)}")
    need(q.quant_storage in QUANT_STORAGE, f"--quantization_config.quant_storage: expected one of "
         f"{' | '.join(map(dtype_name, QUANT_STORAGE))}, got {dtype_name(q.quant_storage)}")
    need(not (t.quantization == "4bit" and t.enable_fsdp and q.quant_storage == torch.uint8),
         "--quantization_config.quant_storage uint8 cannot be sharded (FSDP splits float tensors only): use "
         "bfloat16 (the default), the dtype FSDP gathers in")


def resolve_compile(run: RunConfigs, device: torch.device) -> bool:
    """--torch_compile: auto means per-layer torch.compile on CUDA GPUs only (Triton kernels; on CPU the
    compile time is not repaid in a fine-tuning run), and not for bitsandbytes layers (their weights change
    class when FSDP gathers them, and bitsandbytes restores state inside forward: not measured compiled)."""
    value = str(run.train.torch_compile).strip().lower()
    if value == "auto":
        return device.type == "cuda" and not run.train.quantization
    return value in _TRUE


def save_resolved(run: RunConfigs, path: Path) -> None:
    """Write the resolved config as YAML (readable back with --config)."""
    import yaml

    from shardtune.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(run.to_dict(), sort_keys=False))


__all__ = ["ConfigError", "first_line", "RunConfigs", "parse_cli", "validate", "coerce", "resolve_compile",
           "save_resolved"]
