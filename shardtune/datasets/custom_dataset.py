"""User-defined data sets: ``--custom_dataset.file path.py[:function]``.

The file defines ``get_custom_dataset(dataset_config, tokenizer, split)`` (or the named function),
which returns a map-style data set (``len()`` and ``[i]``) of tokenised samples, and optionally a
collator factory ``fn(tokenizer)`` named by ``--custom_dataset.collator`` (default
``get_data_collator`` when the file defines it).

Fixed relative to the reference: the collator comes from its own hook (the reference called the
``:function`` data set function as the collator), a Windows path's drive colon is not taken for the
``:function`` separator, and the file is executed once per process, not once per lookup.
Note that the file is arbitrary Python and runs with the launcher's rights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

from shardtune.datasets.checks import Source, check_custom_samples
from shardtune.datasets.common import require_file
from shardtune.errors import ConfigError

FLAG = "--custom_dataset.file"
DEFAULT_FUNCTION = "get_custom_dataset"
DEFAULT_COLLATOR = "get_data_collator"
# 'path.py' or 'path.py:function'; the separator is the last colon after '.py', so 'C:\\x\\ds.py' works.
_SPEC = re.compile(r"^(?P<path>.+?\.py)(?::(?P<func>[A-Za-z_]\w*))?$")
_MODULES: Dict[Path, ModuleType] = {}


def parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    match = _SPEC.match(spec.strip())
    if not match:
        raise ConfigError(f"{FLAG}: expected 'path.py' or 'path.py:function', got {spec!r}")
    return match["path"], match["func"]


def load_module(spec: str) -> ModuleType:
    """Execute the user's file once per process and keep the module (keyed by its resolved path)."""
    path_text, _ = parse_spec(spec)
    path = require_file(path_text, FLAG, f"a Python file defining {DEFAULT_FUNCTION}(dataset_config, tokenizer, split)")
    key = path.resolve()
    if key not in _MODULES:
        stem = re.sub(r"\W", "_", key.stem)
        name = f"shardtune_custom_{stem}_{hashlib.sha1(str(key).encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, key)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # lets pickling (DataLoader workers) find its functions
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's syntax or import error, as one line
            del sys.modules[name]
            raise user_code_error(key, exc) from exc
        except BaseException:
            del sys.modules[name]
            raise
        _MODULES[key] = module
    return _MODULES[key]


def user_code_error(path: Path, exc: BaseException) -> ConfigError:
    """One line naming the user's file, the line in it where ``exc`` was raised, and the error."""
    line = exc.lineno if isinstance(exc, SyntaxError) and exc.filename == str(path) else None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == str(path):
            line = lineno  # the innermost frame in the user's file
    where = f"{path}, line {line}" if line else str(path)
    text = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    first = (text.strip().splitlines() or [""])[0]
    return ConfigError(f"{FLAG}: {where}: {type(exc).__name__}: {first}")


def _call_user_function(fn, path: Path, args: tuple):
    """``fn(*args)``, with a wrong signature or an exception inside it reported as one line."""
    try:
        inspect.signature(fn).bind(*args)
    except TypeError as exc:
        raise ConfigError(f"{FLAG}: {path}: {fn.__name__}{inspect.signature(fn)} cannot be called with "
                          f"{len(args)} arguments ({exc})") from None
    except ValueError:  # no signature available (a builtin): just call it
        pass
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise user_code_error(path, exc) from exc


def _function(module: ModuleType, name: str, flag: str, what: str):
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"{flag}: {module.__file__} defines no function {name}{what} "
                          f"(its functions: {', '.join(defined) or 'none'})")
    return fn


def has_collator(dataset_config) -> bool:
    return bool(dataset_config.collator) or callable(getattr(load_module(dataset_config.file), DEFAULT_COLLATOR, None))


def get_custom_dataset(dataset_config, tokenizer, split: str):
    """Call the user's data set function and check that it returned something the loaders can use."""
    _, func_name = parse_spec(dataset_config.file)
    func_name = func_name or DEFAULT_FUNCTION
    module = load_module(dataset_config.file)
    fn = _function(module, func_name, FLAG, "(dataset_config, tokenizer, split)")
    data = _call_user_function(fn, Path(module.__file__), (dataset_config, tokenizer, split))
    where = f"{FLAG}: {func_name}(..., split={split!r})"
    if isinstance(data, (Mapping, str, bytes)) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        hint = " (a DatasetDict: return one split, e.g. ds[split])" if isinstance(data, Mapping) else ""
        raise ConfigError(f"{where} returned {type(data).__name__}{hint}; return a map-style data set (len() and "
                          "[i]), e.g. a list of dicts or a datasets.Dataset")
    if len(data) == 0:
        raise ConfigError(f"{where} returned an empty data set")
    if not has_collator(dataset_config):
        first = data[0]
        if not (isinstance(first, Mapping) and "input_ids" in first and "labels" in first):
            raise ConfigError(f"{where}: samples must be dicts with 'input_ids' and 'labels' (got "
                              f"{type(first).__name__} {sorted(first) if isinstance(first, Mapping) else ''}), "
                              f"or define a collator ({DEFAULT_COLLATOR}(tokenizer) or --custom_dataset.collator)")
    return data


def check_samples(data, dataset_config, split: str, vocab_size: int, context_length: Optional[int]):
    """Every sample's token ids, field lengths and supervision (datasets/checks.py), each error naming the
    file, the function and the sample; samples without a supervised token are dropped with one warning."""
    _, func_name = parse_spec(dataset_config.file)
    path = Path(load_module(dataset_config.file).__file__)
    source = Source(f"{FLAG} {path}: {func_name or DEFAULT_FUNCTION}(..., split={split!r})", lambda i: f"sample [{i}]")

    def read(i: int):
        try:
            return data[i]
        except Exception as exc:  # noqa: BLE001 - the user's __getitem__ failing, as one line
            raise user_code_error(path, exc) from exc

    return check_custom_samples(data, source, vocab_size, context_length, read)


def get_data_collator(dataset_config, tokenizer):
    """The collator from the hook ``--custom_dataset.collator`` (default get_data_collator), or None."""
    module = load_module(dataset_config.file)
    name = dataset_config.collator or DEFAULT_COLLATOR
    if not dataset_config.collator and not callable(getattr(module, name, None)):
        return None  # no hook: the built-in padding / packing collators are used
    fn = _function(module, name, "--custom_dataset.collator", "(tokenizer)")
    collator = _call_user_function(fn, Path(module.__file__), (tokenizer,))
    if not callable(collator):
        raise ConfigError(f"--custom_dataset.collator: {name}(tokenizer) returned {type(collator).__name__}; "
                          "return a callable that turns a list of samples into a batch dict")
    return collator
