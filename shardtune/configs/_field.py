"""A tiny helper so every config field carries its documentation, and what makes it meaningful.

`--help` reads `metadata["help"]`, so a field without documentation is a bug (tests check that every field has
some). configs/validate.py reads the rest: the interval a number must lie in, the values a string may take, and
what a field needs to have any effect (``needs``), declared here, next to the help, so that a field added later
is checked like every other.

``needs`` clauses name another field by its flag (``use_peft``, ``fsdp_config.optimizer``) and say what it must be:

* ``"use_peft"``: the switch must be on (truthy: True, a non-empty string, a non-zero number);
* ``"not use_peft"``: the switch must be off;
* ``"peft_method=lora"``: the field must have this value (compared as text, case-insensitively);
* ``"save_model or save_every_n_steps"``: any one of the alternatives.

A config class may declare ``NEEDS`` (a tuple of clauses) for all its fields at once: the switch of its group
(``lora_config`` needs ``use_peft`` and ``peft_method=lora``). A field or group whose needs are not met is
refused when it is given on the command line or in ``--config``: it would be silently ignored otherwise.
"""
from dataclasses import field as _dc_field
from typing import Any, Sequence

# The words a boolean flag accepts (--use_peft True, --use_peft no, ...).
TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}


def doc(default: Any, help: str, *, factory: bool = False, deprecated: str = "", unsupported: str = "",
        valid: str = "", choices: Sequence[str] = (), needs: Sequence[str] = ()):
    """A dataclass field with a default and a help text.

    factory=True makes a fresh copy of a mutable default (lists) for every instance.
    deprecated="why" marks a field kept only so that reference commands still parse: setting it prints one
    warning line with the reason, and it has no effect.
    unsupported="why" marks a reference field whose feature shardtune does not have: setting it stops the
    run with one error line (better than training differently from what was asked).
    valid="[0, 1)" is the interval a number must lie in ('inf' for no upper bound).
    choices=("packing", "padding") are the values a string field may take (compared case-insensitively).
    needs=("use_peft",) are the clauses (module docstring) that must hold for the field to have any effect.
    --help prints the interval, the choices and the needs.
    """
    metadata = {"help": help}
    if valid:
        metadata["valid"] = valid
    if choices:
        metadata["choices"] = tuple(choices)
    if needs:
        metadata["needs"] = (needs,) if isinstance(needs, str) else tuple(needs)
    if deprecated:
        metadata["deprecated"] = deprecated
    if unsupported:
        metadata["unsupported"] = unsupported
    if factory:
        return _dc_field(default_factory=lambda: list(default), metadata=metadata)
    return _dc_field(default=default, metadata=metadata)
