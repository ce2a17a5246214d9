"""Command line and config file -> typed, validated configs.

Rules (``--help`` prints them short; configs/help.py):

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
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from shardtune.configs._field import FALSE_WORDS, TRUE_WORDS
from shardtune.configs.presets import DEMO_PRESET
from shardtune.configs.run import RunConfigs
from shardtune.configs.validate import validate
from shardtune.errors import ConfigError, first_line
from shardtune.utils.io import read_text

# ---------------------------------------------------------------------------------------------
# Type coercion
# ---------------------------------------------------------------------------------------------
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
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
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
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"--config: {path} is a directory, not a file (give a YAML or JSON file of config keys)")
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {path} (give a YAML or JSON file of config keys)")
    text = read_text(p, "--config")
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


def parse_cli(kwargs: Dict[str, Any], *, refuse_ineffective: bool = True) -> RunConfigs:
    """Build validated configs from fire's keyword arguments (and ``--config FILE``). ``refuse_ineffective=False``
    accepts fields that would have no effect: for reading back a checkpoint's own run_config.yaml, which before
    this check existed held every field."""
    run = RunConfigs()
    kwargs = dict(kwargs)
    file_path = kwargs.pop("config", None)
    merged: Dict[str, Any] = {}
    if file_path is not None:
        merged.update(load_config_file(str(file_path), run))
    merged.update(kwargs)  # command line wins over the file
    run.demo_preset = not any(k in merged for k in ("model_name", "train_config.model_name"))
    if run.demo_preset:  # no model given: the embedded demo (configs/presets.py); the user's flags override it
        given = {k.rsplit(".", 1)[-1] for k in merged}
        for key, value in DEMO_PRESET.items():
            if key.rsplit(".", 1)[-1] not in given:
                _set(run, key, value)

    # train_config.peft_method and .dataset decide the plain-key priority: apply them first.
    for selector in ("peft_method", "dataset"):
        for key in (selector, f"train_config.{selector}"):
            if key in merged:
                _set(run, key, merged[key])
    for key, value in merged.items():
        given = _set(run, key, value)
        if refuse_ineffective:
            run.given.add(given)
    validate(run)
    return run


def _set(run: RunConfigs, key: str, value: Any) -> Tuple[str, str]:
    """Set one field from a flag (plain or ``config.field``); returns the (config, field) it set."""
    key = key.replace("-", "_")
    names = run.by_name()
    if "." in key:
        prefix, _, name = key.partition(".")
        if prefix not in names:
            raise _unknown(key, run, f"; '{prefix}' is not a config (configs: {', '.join(names)})")
        if "." in name:
            raise _unknown(key, run, "; use one dot: --config_name.field")
        cfg = names[prefix]
        if name not in _field_types(cfg):
            raise _unknown(key, run)
    else:
        cfg = next((c for c in run.all_configs() if key in _field_types(c)), None)
        if cfg is None:
            raise _unknown(key, run)
        name = key
    tp = _field_types(cfg)[name]
    if isinstance(value, bool) and _not_a_switch(cfg, name, tp):
        # fire turns a flag given without a value (`--output_dir` last, or followed by another flag) into True
        raise ConfigError(f"--{key} needs a value (it was given without one); e.g. --{key} VALUE")
    setattr(cfg, name, coerce(value, tp, f"--{key}"))
    return type(cfg).__name__, name


def _not_a_switch(cfg, name: str, tp) -> bool:
    """A field for which a bare flag (True) is no value: every type but bool, except a text field whose choices
    include True (torch_compile may be given alone)."""
    if tp in (bool, Optional[bool]):
        return False
    choices = next(f for f in fields(cfg) if f.name == name).metadata.get("choices", ())
    return "true" not in {c.lower() for c in choices}


def resolve_compile(run: RunConfigs, device: torch.device) -> bool:
    """--torch_compile: auto means per-layer torch.compile on CUDA GPUs only (Triton kernels; on CPU the
    compile time is not repaid in a fine-tuning run), and not for bitsandbytes layers (their weights change
    class when FSDP gathers them, and bitsandbytes restores state inside forward: not measured compiled)."""
    value = str(run.train.torch_compile).strip().lower()
    if value == "auto":
        return device.type == "cuda" and not run.train.quantization
    return value in TRUE_WORDS


def save_resolved(run: RunConfigs, path: Path) -> None:
    """Write the resolved config as YAML (readable back with --config)."""
    import yaml

    from shardtune.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(run.to_dict(), sort_keys=False))


