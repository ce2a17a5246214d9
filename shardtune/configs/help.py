"""What the command line prints about configs: ``--help [CONFIG]`` and the start-of-run settings.

``--help`` is a short usage, then per config a title line, its one-sentence docstring and one aligned
row per field: ``--flag  TYPE  default  doc``. The flag shown is the shortest one that reaches the
field with the default selections (plain when this config wins the plain name, else
``--config_name.field``). ``--help fsdp_config`` prints that config alone. Lines fit the terminal (at most
100 columns); a break never falls inside a word, an interval such as ``[0, inf)`` or after an "e.g.".

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
MAX_WIDTH, MIN_WIDTH = 100, 60  # --help wraps to the terminal, within these


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


NBSP = "\u00a0"  # glues what must stay on one line; textwrap does not break at it, and it prints as a space
_INTERVAL = re.compile(r"[\[(]-?[\w.]+, -?[\w.]+[\])]")  # [0, inf), (0, 1]
_ABBREVIATION = re.compile(r"\b(e\.g\.|i\.e\.|cf\.|vs\.|etc\.) ")  # not a sentence's end; kept with the next word
MIN_DOC_ROOM = 24  # narrower than this beside the columns, a field's doc starts on its own line
DOC_INDENT = 8


def _glued(text: str) -> str:
    """``text`` with the spaces inside intervals and after abbreviations made unbreakable."""
    text = _INTERVAL.sub(lambda m: m.group(0).replace(" ", NBSP), text)
    return _ABBREVIATION.sub(lambda m: m.group(1) + NBSP, text)


def _wrap(text: str, width: int, first: str = "", indent: str = "") -> List[str]:
    """``first + text`` wrapped to ``width`` (later lines start with ``indent``); never breaks a word, an
    interval or an abbreviation from its word."""
    wrapper = textwrap.TextWrapper(width=width, initial_indent=first, subsequent_indent=indent,
                                   break_long_words=False, break_on_hyphens=False)
    return [line.replace(NBSP, " ") for line in wrapper.wrap(_glued(text))] or [first.rstrip()]


def _cut(text: str, room: int) -> str:
    """The first sentence of a field's help, cut at a word to fit ``room`` (then ``...``), with the spaces of its
    intervals and abbreviations glued: the cut never ends inside one, nor on an "e.g"."""
    text = re.split(r"(?<=\.) ", _glued(text), maxsplit=1)[0].rstrip(".")
    if len(text) > room:
        text = text[:max(room - 4, 10)].rsplit(" ", 1)[0].rstrip(" ,;:(") + " ..."
    return text


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
    suffix = _glued("".join(" " + n for n in notes))
    return (_cut(text, room - len(suffix)) + suffix).replace(NBSP, " ")


def format_config(run: RunConfigs, name: str, width: int, full: bool = True) -> List[str]:
    """One config: ``name: sentence`` and a row per field. ``full``: whole help texts, wrapped under the doc
    column; otherwise each row is one line with the first sentence (``--help CONFIG`` has the rest). Where the
    columns leave the doc too little room (a narrow terminal), it goes on the lines below, indented."""
    cfg = run.by_name()[name]
    types = _field_types(cfg)
    rows = [(_flag_for(run, name, f.name), _type_text(types[f.name]), _default_text(getattr(cfg, f.name)), f)
            for f in fields(cfg)]
    flag_w = max(len(r[0]) for r in rows)
    type_w = max(len(r[1]) for r in rows)
    default_w = min(DEFAULT_WIDTH, max(len(r[2]) for r in rows))
    indent = 2 + flag_w + 2 + type_w + 2 + default_w + 2
    longest_word = max((len(w) for r in rows for w in _glued(_doc_text(cfg, r[3], full)).split(" ")), default=0)
    if width - indent < max(MIN_DOC_ROOM, longest_word if full else 0):
        indent = DOC_INDENT  # the docs go below their flags, where every word fits
    lines = _wrap(_title(cfg), width, f"{name}: ", "  ")
    for flag, tp, default, f in rows:
        head = f"  {flag:<{flag_w}}  {tp:<{type_w}}  {default:<{default_w}}  "
        if len(head.rstrip()) > width:  # a long flag beside a long default: the default gets a line of its own
            lines += [f"  {flag:<{flag_w}}  {tp}", " " * DOC_INDENT + f"default: {default}"]
            head = " " * indent
        if len(head) > indent:  # an over-long default or a narrow terminal: the doc starts on the next line
            lines.append(head.rstrip())
            head = " " * indent
        if full:
            lines += _wrap(_doc_text(cfg, f, True), width, head, " " * indent)
        else:
            line = head + _doc_text(cfg, f, False, width - indent)
            if len(line) > width:  # its range or note alone fills the room: the doc goes below, indented
                lines.append(head.rstrip())
                line = " " * DOC_INDENT + _doc_text(cfg, f, False, width - DOC_INDENT)
            lines.append(line)
    return lines


def _usage(width: int) -> List[str]:
    """USAGE, each line longer than ``width`` wrapped under its own description column."""
    lines = []
    for line in USAGE.splitlines():
        column = re.match(r"\s*\S.*?\s{2,}(?=\S)", line)
        indent = " " * (len(column.group(0)) if column and len(column.group(0)) < width // 2 else 4)
        lines += _wrap(line.lstrip(), width, line[:len(line) - len(line.lstrip())], indent) if line else [""]
    return lines


def terminal_width() -> int:
    """The terminal's columns, at most MAX_WIDTH (long lines read badly) and at least MIN_WIDTH."""
    return max(MIN_WIDTH, min(shutil.get_terminal_size((MAX_WIDTH, 24)).columns, MAX_WIDTH))


def format_help(config: Optional[str] = None, width: Optional[int] = None) -> str:
    """The ``--help`` text: usage and every config with one line per field; or, when ``config`` names one,
    that config with its fields' whole help texts. ``width``: the terminal's (terminal_width)."""
    run = RunConfigs()
    width = width or terminal_width()
    names = list(run.by_name())
    if config is not None:
        if config not in names:
            raise ConfigError(f"--help: no config {config!r}; configs: {', '.join(names)}")
        return "\n".join(format_config(run, config, width, full=True))
    lines = _usage(width) + [""] + _wrap("configs (--help CONFIG shows one, with each field's whole help): "
                                         + ", ".join(names), width, "", "  ")
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


__all__ = ["format_help", "format_config", "terminal_width", "changed_settings", "format_changed_settings", "USAGE"]
