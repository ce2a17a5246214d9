"""A tiny helper so every config field carries its documentation.

`--help` reads `metadata["help"]`, so a field without documentation is a bug
(tests check that every field has some).
"""
from dataclasses import field as _dc_field
from typing import Any

# The words a boolean flag accepts (--use_peft True, --use_peft no, ...).
TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}


def doc(default: Any, help: str, *, factory: bool = False, deprecated: str = "", unsupported: str = "",
        valid: str = ""):
    """A dataclass field with a default and a help text.

    factory=True makes a fresh copy of a mutable default (lists) for every instance.
    deprecated="why" marks a field kept only so that reference commands still parse: setting it prints one
    warning line with the reason, and it has no effect.
    unsupported="why" marks a reference field whose feature shardtune does not have: setting it stops the
    run with one error line (better than training differently from what was asked).
    valid="[0, 1)" is the interval a number must lie in ('inf' for no upper bound); config_utils.validate
    checks it and --help prints it.
    """
    metadata = {"help": help}
    if valid:
        metadata["valid"] = valid
    if deprecated:
        metadata["deprecated"] = deprecated
    if unsupported:
        metadata["unsupported"] = unsupported
    if factory:
        return _dc_field(default_factory=lambda: list(default), metadata=metadata)
    return _dc_field(default=default, metadata=metadata)
