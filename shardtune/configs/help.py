"""What the command line prints about configs: ``--help [CONFIG]`` and the start-of-run settings.

``--help`` is a short usage, then per config a title line, its one-sentence docstring and one aligned
row per field: ``--flag  TYPE  default  doc``. The flag shown is the shortest one that reaches the
field with the default selections (plain when this config wins the plain name, else
``--config_name.field``). ``--help fsdp_config`` prints that config alone.

A run prints only the settings that differ from the defaults (``changed_settings``); the complete
resolved config goes to ``<output_dir>/run_config.yaml``.
"""
from __future__ import annotations

import enum
import re
import shutil
import textwrap
import typing
from dataclasses import fields
from typing import List, Optional

import torch

from shardtune.configs.needs import field_needs
from shardtune.configs.parse import _field_types
from shardtune.configs.run import RunConfigs, _plain
from shardtune.errors import ConfigError

USAGE = """\
usage: finetuning.py [--config FILE] [--FIELD VALUE ...] [--CONFIG.FIELD VALUE ...]
       finetuning.py --help [CONFIG]        one config only, e.g. --help fsdp_config

  --FIELD VALUE         sets the field in the first config listed below that has it (of the PEFT and
                        data set configs, the one --peft_method / --dataset selects comes first)
  --CONFIG.FIELD VALUE  sets exactly one config's field, e.g. --fsdp_config.use_fp16 True
  --config FILE         reads the same keys from YAML or JSON (flat, or nested by config); flags win
  Booleans alone mean True (--use_peft); lists are a,b; enums and dtypes go by name (bfloat16).
  Bad input stops before anything is written: one 'error:' line, exit status 2 (--debug: traceback)."""

DEFAULT_WIDTH = 18  # default column; a longer default pushes its doc text to the next line


def _type_text(tp) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "choice"
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return _type_text([a for a in typing.get_args(tp) if a is not type(None)][0])
    if origin in (list, List):
        return "list"
    if tp is torch.dtype:
        return "dtype"
    return getattr(tp, "__name__", str(tp))


def _default_text(value) -> str:
    from shardtune.configs.paths import ASSETS_DIR

    value = _plain(value)
    if isinstance(value, str) and value.startswith(str(ASSETS_DIR)):
        return "(bundled)"  # the tiny model or the Alpaca sample inside the package
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if value == "":
        return '""'
    return str(value)


def _title(cfg) -> str:
    """The config class's own docstring (a dataclass without one gets its signature: not a title)."""
    text = (type(cfg).__dict__.get("__doc__") or "").strip()
    return "" if text.startswith(type(cfg).__name__ + "(") else text.splitlines()[0]


def _flag_for(run: RunConfigs, config_name: str, field_name: str) -> str:
    for cfg in run.all_configs():  # plain names go to the first config that has the field
        if field_name in {f.name for f in fields(cfg)}:
            return f"--{field_name}" if type(cfg).__name__ == config_name else f"--{config_name}.{field_name}"
    return f"--{config_name}.{field_name}"


def _doc_text(cfg, f, full: bool, room: int = 0) -> str:
    """The field's help: whole (``--help CONFIG``, with its choices and what it needs to take effect) or its first
    sentence cut to ``room`` (``--help``), with its range and whether it is deprecated or refused (never cut)."""
    text, notes = f.metadata.get("help", ""), []
    if f.metadata.get("valid"):
        notes.append(f"Valid: {f.metadata['valid']}." if full else f.metadata["valid"])
    if full and f.metadata.get("choices"):
        notes.append(f"Choices: {' | '.join(f.metadata['choices'])}.")
    if full and field_needs(cfg, f):
        notes.append(f"Takes effect only with: {'; '.join(field_needs(cfg, f))} (refused otherwise).")
    if f.metadata.get("deprecated"):
        notes.append(f"Deprecated: {f.metadata['deprecated']}." if full else "(deprecated)")
    if f.metadata.get("unsupported"):
        notes.append(f"Refused when set: {f.metadata['unsupported']}." if full else "(refused when set)")
    if full:
        return " ".join([text] + notes)
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    suffix = "".join(" " + n for n in notes)
    room -= len(suffix)
    if len(text) > room:
        text = text[:max(room - 4, 10)].rsplit(" ", 1)[0] + " ..."
    return text + suffix


def format_config(run: RunConfigs, name: str, width: int, full: bool = True) -> List[str]:
    """One config: ``name: sentence`` and a row per field. ``full``: whole help texts, wrapped under the doc
    column; otherwise each row is one line with the first sentence (``--help CONFIG`` has the rest)."""
    cfg = run.by_name()[name]
    types = _field_types(cfg)
    rows = [(_flag_for(run, name, f.name), _type_text(types[f.name]), _default_text(getattr(cfg, f.name)), f)
            for f in fields(cfg)]
    flag_w = max(len(r[0]) for r in rows)
    type_w = max(len(r[1]) for r in rows)
    default_w = min(DEFAULT_WIDTH, max(len(r[2]) for r in rows))
    indent = 2 + flag_w + 2 + type_w + 2 + default_w + 2
    wrap = textwrap.TextWrapper(width=max(width, indent + 30), subsequent_indent=" " * indent)
    lines = [f"{name}: {_title(cfg)}"]
    for flag, tp, default, f in rows:
        head = f"  {flag:<{flag_w}}  {tp:<{type_w}}  {default:<{default_w}}  "
        if len(head) > indent:  # an over-long default: its doc starts on the next line, aligned
            lines.append(head.rstrip())
            head = " " * indent
        text = _doc_text(cfg, f, full, max(width - indent, 30))
        lines.append(wrap.fill(head + text) if full else head + text)
    return lines


def format_help(config: Optional[str] = None, width: Optional[int] = None) -> str:
    """The ``--help`` text: usage and every config with one line per field; or, when ``config`` names one,
    that config with its fields' whole help texts."""
    run = RunConfigs()
    width = width or max(shutil.get_terminal_size((120, 24)).columns, 100)
    names = list(run.by_name())
    if config is not None:
        if config not in names:
            raise ConfigError(f"--help: no config {config!r}; configs: {', '.join(names)}")
        return "\n".join(format_config(run, config, width, full=True))
    lines = [USAGE, "", textwrap.fill("configs (--help CONFIG shows one, with each field's whole help): "
                                      + ", ".join(names), width=width, subsequent_indent="  ")]
    for name in names:
        lines += [""] + format_config(run, name, width, full=False)
    return "\n".join(lines)


def changed_settings(run: RunConfigs) -> dict:
    """{config: {field: value}} of every field that differs from its default, in the saved YAML's form
    (the same configs as run_config.yaml: train, fsdp, the selected PEFT and data set configs, the rest)."""
    changed = {}
    for name, values in run.to_dict().items():
        defaults = type(run.by_name()[name])()
        diff = {k: v for k, v in values.items() if v != _plain(getattr(defaults, k))}
        if diff:
            changed[name] = diff
    return changed


def format_changed_settings(run: RunConfigs) -> str:
    import yaml

    changed = changed_settings(run)
    if not changed:
        return "every setting at its default"
    return yaml.safe_dump(changed, sort_keys=False, width=1000).rstrip()


__all__ = ["format_help", "format_config", "changed_settings", "format_changed_settings", "USAGE"]
