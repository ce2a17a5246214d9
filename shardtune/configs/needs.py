"""What makes a config field meaningful: the ``needs`` clauses declared next to each field (configs/_field.py)
and by each config class (``NEEDS``, the switch of its group), read in one place.

Used by the validator (a field given while its needs are unmet is refused: it would do nothing) and by the saved
``run_config.yaml`` (which holds only the fields that take effect, so that ``--config`` reads it back).
"""
from __future__ import annotations

import enum
from dataclasses import Field, fields
from typing import Any, List, Optional, Tuple

import torch


def flag(config_name: str, field_name: str) -> str:
    """How a message names a field: plain for train_config (its fields win plain keys), qualified otherwise."""
    return f"--{field_name}" if config_name == "train_config" else f"--{config_name}.{field_name}"


def as_text(value: Any) -> str:
    """A value as a user types it: enums by name, dtypes without 'torch.'."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _lookup(run, name: str) -> Tuple[str, Any]:
    """The config name and value of a clause's field: ``fsdp_config.optimizer`` or a plain name (first config)."""
    configs = run.by_name()
    if "." in name:
        config_name, _, field_name = name.partition(".")
        return config_name, getattr(configs[config_name], field_name)
    for config_name, cfg in configs.items():
        if any(f.name == name for f in fields(cfg)):
            return config_name, getattr(cfg, name)
    raise KeyError(f"needs clause names no field: {name}")  # a declaration bug, caught by tests/test_config_needs


def _holds(run, term: str) -> bool:
    term = term.strip()
    if term.startswith("not "):
        return not _holds(run, term[4:])
    if "=" in term:
        name, _, wanted = term.partition("=")
        return as_text(_lookup(run, name.strip())[1]).lower() == wanted.strip().lower()
    return bool(_lookup(run, term)[1])


def clause_holds(run, clause: str) -> bool:
    return any(_holds(run, alternative) for alternative in clause.split(" or "))


def field_needs(cfg, f: Field) -> List[str]:
    """The group's clauses, then the field's own."""
    return list(getattr(type(cfg), "NEEDS", ())) + list(f.metadata.get("needs", ()))


def unmet_clause(run, cfg, f: Field) -> Optional[str]:
    """The first clause of ``f`` that does not hold (None: the field takes effect)."""
    return next((c for c in field_needs(cfg, f) if not clause_holds(run, c)), None)


def _term_flag(run, term: str) -> str:
    name = term.strip().removeprefix("not ").partition("=")[0].strip()
    config_name, _ = _lookup(run, name)
    return flag(config_name, name.rpartition(".")[2])


def fields_needing(config_class, clause: str) -> List[str]:
    """The names of ``config_class``'s fields that declare ``clause`` (e.g. the fsdp_config fields that need
    ``enable_fsdp``: the ones only a sharded run uses)."""
    return [f.name for f in fields(config_class) if clause in f.metadata.get("needs", ())]


def describe_unmet(run, config_name: str, field_name: str, clause: str) -> str:
    """One line: which flag does nothing, why, and what was probably meant."""
    me = flag(config_name, field_name)
    alternatives = [a.strip() for a in clause.split(" or ")]
    if len(alternatives) > 1:
        wanted = " or ".join(_term_flag(run, a) for a in alternatives)
        return f"{me} has no effect unless {wanted} is set: set one of them or drop {me}"
    term = alternatives[0]
    other = _term_flag(run, term)
    if term.startswith("not "):
        return f"{me} has no effect with {other}: drop one of them"
    if "=" in term:
        wanted = term.partition("=")[2].strip()
        actual = _lookup(run, term.partition("=")[0].strip())[1]
        if not actual:  # a switch that is off (None, False, ""): say what to turn on
            return f"{me} has no effect without {other} {wanted}: set {other} {wanted} or drop {me}"
        actual = as_text(actual)
        return (f"{me} has no effect with {other} {actual}: it applies to {other} {wanted}; set {other} {wanted} "
                f"or drop {me}")
    switch = _lookup(run, term)[1]
    add = f"add {other}" if isinstance(switch, bool) else f"set {other}"
    return f"{me} has no effect without {other}: {add} or drop {me}"
