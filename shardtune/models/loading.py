"""Loading a causal LM and its tokenizer from a local folder, a .gguf file or a hub id.

Model code stays Hugging Face's; nothing here knows about sharding (that lives in ``policies/`` and
``policies/fsdp.py``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from shardtune.errors import ConfigError, first_line
from shardtune.utils.logging import log, warn


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads: a folder or hub id, plus an optional GGUF file name in it."""

    path: str
    gguf_file: Optional[str] = None

    @classmethod
    def parse(cls, name: str, flag: str = "--model_name") -> "ModelSource":
        p = Path(os.path.expanduser(name))
        if p.suffix == ".gguf":
            if not p.is_file():
                raise ConfigError(f"{flag}: GGUF file not found: {name}")
            return cls(str(p.parent), p.name)
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{flag}: {name} is a file; give a model folder, a .gguf file or a hub id")
            return cls(str(p))
        looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
        if looks_like_path:
            raise ConfigError(f"{flag}: folder not found: {name} (give a local model folder or a hub id like "
                              f"'meta-llama/Llama-3.2-1B')")
        return cls(name)  # a hub id

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def load_model_config(src: ModelSource, flag: str = "--model_name"):
    """Read the model's config (cheap) and check it is a causal LM, before any weights are loaded."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(src.path, **src.kwargs())
    except Exception as exc:  # noqa: BLE001 - hub/network/format errors become one line
        raise ConfigError(f"{flag}: cannot load a model config from {src.path!r}: {first_line(exc)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{flag}: model type {config.model_type!r} is not a causal language model "
                          f"(AutoModelForCausalLM cannot load it)")
    return config


def _safetensors_header(path: Path, flag: str) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets), after checking that
    the file is whole; a truncated or corrupt file is one line."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError(f"its header needs {header_len} bytes, the file has {size}")
            header = json.loads(fh.read(header_len))
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ConfigError(f"{flag}: {path} is not a valid safetensors file ({first_line(exc)}); re-download or "
                          "re-save the model") from None
    if 8 + header_len + data_end > size:
        raise ConfigError(f"{flag}: {path} is truncated ({size} bytes of {8 + header_len + data_end}); "
                          "re-download or re-save the model")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _weight_files_loaded(folder: Path, flag: str) -> list:
    """The safetensors files from_pretrained reads: model.safetensors, else the shards its index names."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{flag}: {index} is not a valid safetensors index ({first_line(exc)})") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"{flag}: {index} names {len(missing)} weight file(s) that are not in the folder, "
                          f"e.g. {missing[0]}; re-download the model")
    return [folder / n for n in names]


def check_weight_files(src: ModelSource, flag: str = "--model_name") -> None:
    """Catch truncated or corrupt safetensors files of a local model folder, and a config.json that does
    not match them, from the headers alone, before anything is written (loading fails deep inside
    from_pretrained after minutes on a big model, or, worse, fills what the weights lack with random
    values and trains them)."""
    folder = Path(src.path)
    if src.gguf_file or not folder.is_dir():
        return
    headers = {path: _safetensors_header(path, flag) for path in sorted(folder.glob("*.safetensors"))}
    shapes = {}  # tensor name -> (shape, the file holding it), over the files from_pretrained reads
    for path in _weight_files_loaded(folder, flag):
        header = headers[path] if path in headers else _safetensors_header(path, flag)
        shapes.update({name: (list(info["shape"]), path) for name, info in header.items()})
    if shapes:
        check_weights_match_config(shapes, load_model_config(src, flag), folder / "config.json", flag)


_LAYER_KEY = re.compile(r"^(?P<prefix>(?:[A-Za-z_]\w*\.)+?)(?P<index>\d+)\.")


def check_weights_match_config(shapes: dict, model_config, config_path: Path, flag: str) -> None:
    """The weights (``shapes``: name -> (shape, file)) hold every decoder layer config.json asks for, and every
    tensor the model and the weights both name has the same shape in both."""
    layers = getattr(model_config.get_text_config(), "num_hidden_layers", None)
    indices = {}  # the key prefix before the first number (e.g. 'model.layers.') -> layer indices found
    for name in shapes:
        match = _LAYER_KEY.match(name)
        if match:
            indices.setdefault(match["prefix"], set()).add(int(match["index"]))
    if layers and indices:
        prefix, found = max(indices.items(), key=lambda kv: len(kv[1]))  # the decoder stack: the longest list
        absent = sorted(set(range(layers)) - found)
        if absent:  # more layers in the weights than asked for is not an error: some models keep extra ones
            files = sorted({f.name for name, (_, f) in shapes.items() if name.startswith(prefix)})
            raise ConfigError(f"{flag}: {config_path} asks for {layers} decoder layers (num_hidden_layers) but the "
                              f"weights ({', '.join(files)}) hold {len(found & set(range(layers)))}: "
                              f"{_ranges(absent)} would start from random weights and be trained; fix "
                              "num_hidden_layers or use the model's own weight files")
    if getattr(model_config, "quantization_config", None):
        return  # pre-quantized weights are stored packed: their shapes are not the model's
    expected, prefix = _parameter_shapes(model_config)
    for name, (shape, file) in shapes.items():
        want = expected.get(name, expected.get(f"{prefix}.{name}"))
        if want is not None and list(want) != shape:
            raise ConfigError(f"{flag}: {file} holds {name} with shape {shape}, but {config_path} describes a "
                              f"model whose {name} has shape {list(want)}: the config does not match the weights "
                              "(re-download the model or restore its config.json)")


def _parameter_shapes(model_config) -> Tuple[dict, str]:
    """Parameter and buffer shapes of the model config.json describes, built on the meta device (no memory,
    no weights read), and the model's base_model_prefix (weights saved from the base model lack it); {}
    when the architecture cannot be built that way (from_pretrained then reports why itself)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception:  # noqa: BLE001 - e.g. remote code: from_pretrained gives the real error later
        return {}, ""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, getattr(model, "base_model_prefix", "")


def _ranges(numbers: list) -> str:
    """[2, 3, 4, 7] -> 'layers 2-4, 7'."""
    spans, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ("layer " if len(numbers) == 1 else "layers ") + ", ".join(spans)


def check_against_model_config(train_config, model_config) -> None:
    """Flags that depend on the model's shape, checked from its config before any weights are read."""
    t = train_config
    layers = getattr(model_config, "num_hidden_layers", None)
    if t.freeze_layers and layers is not None and t.num_freeze_layers > layers:
        raise ConfigError(f"--num_freeze_layers: {t.num_freeze_layers} exceeds the model's {layers} decoder layers")
    limit = getattr(model_config, "max_position_embeddings", None)
    context_length = t.context_length
    if limit and context_length > limit:
        warn(f"--context_length {context_length} exceeds the model's max_position_embeddings ({limit}): positions "
             "beyond it were never trained and may give poor results")


def load_tokenizer(name: str, flag: str = "--tokenizer_name"):
    """The tokenizer, with a pad token: eos is used only when the tokenizer has none."""
    from transformers import AutoTokenizer

    src = ModelSource.parse(name, flag)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{flag}: cannot load a tokenizer from {name!r}: {first_line(exc)}") from None
    if tok.pad_token_id is None:  # None, not falsy: pad id 0 is a valid pad token
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _supports_flex_attention(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return bool(getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_flex_attn", False))
    except KeyError:
        return False


def pick_attention(requested: str, use_fast_kernels: bool, device: torch.device, config=None,
                   prompt_learning: bool = False, packing: bool = True) -> Optional[str]:
    """The attention implementation for from_pretrained (--attn_implementation), logged once.

    Why flex_attention on GPUs: packed blocks keep documents apart through position_ids that restart at
    every document (data/packing.py). For SDPA transformers turns them into a dense 4-D block-diagonal
    mask, and SDPA with an explicit mask cannot use its flash kernel (7.65 ms per Llama-3.2-1B layer,
    forward + backward, 4 x 4096 tokens, H200); for flex_attention it builds a sparse BlockMask from the
    same position_ids and the compiled kernel skips the masked blocks (1.45 ms; plain causal SDPA, which
    attends across documents, takes 2.61 ms). A document's loss inside a block equals its loss alone on
    both paths (tests/test_packing.py on CPU, tests/gpu on CUDA).
    """
    if requested == "auto":
        if use_fast_kernels and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            requested, why = "flash_attention_2", "--use_fast_kernels with the flash-attn package"
        elif device.type != "cuda":
            requested, why = "sdpa", "CPU: no fused kernel for packed documents here; SDPA with the document mask"
        elif prompt_learning:
            requested, why = "sdpa", "prefix tuning feeds a KV cache, which the packed-document BlockMask does not take"
        elif not packing:
            # Padded batches change length from batch to batch: FlexAttention would recompile for new lengths,
            # and there are no documents to keep apart, so SDPA's own kernels are the right choice.
            requested, why = "sdpa", "padded batches (no packed documents)"
        elif config is not None and not _supports_flex_attention(config):
            requested, why = "sdpa", f"{config.model_type} has no flex_attention support in transformers"
        else:
            requested, why = "flex_attention", ("CUDA: one compiled kernel that skips the blocks the document mask "
                                                "removes (set --attn_implementation sdpa for the dense mask)")
    else:
        why = "--attn_implementation"
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("--attn_implementation flash_attention_2 needs the flash-attn package "
                          "(pip install 'shardtune[fast]'); or use flex_attention / sdpa")
    log(f"--> attention: {requested} ({why})")
    return requested


def load_model(name: str, precision: str, device: torch.device, *, use_fast_kernels: bool = False,
               attn_implementation: str = "auto", prompt_learning: bool = False, bnb_config=None,
               meta: bool = False, dtype: Optional[torch.dtype] = None, packing: bool = True):
    """A causal LM with master weights in the dtype ``precision`` asks for (or in ``dtype``: sharded runs
    read the checkpoint's own dtype and upcast per FSDP unit on the GPU, see policies/placement.py: UnitPlacer).

    meta=True builds the architecture on the meta device without reading weights (low_cpu_fsdp ranks
    other than 0 receive the weights later by broadcast).
    """
    from transformers import AutoModelForCausalLM

    src = ModelSource.parse(name)
    config = load_model_config(src)
    from shardtune.configs.precision import master_dtype

    dtype = dtype or master_dtype(precision)  # configs/precision.py: fp32 master weights for the mixed modes
    attn = pick_attention(attn_implementation, use_fast_kernels, device, config, prompt_learning, packing)
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        kwargs = dict(dtype=dtype, attn_implementation=attn, **src.kwargs())
        if bnb_config is not None:
            kwargs["quantization_config"] = bnb_config
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    # config.use_cache stays as the checkpoint has it (exports keep the model's own config.json); the
    # training forward passes use_cache=False itself.
    return model


def maybe_resize_embeddings(model, tokenizer) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        warn(f"tokenizer has {len(tokenizer)} tokens but the embedding has {rows} rows; resizing the embedding")
        model.resize_token_embeddings(len(tokenizer))


def decoder_layers(model) -> list:
    """The model's repeated decoder blocks, found from the model itself (not hard-coded to Llama).

    Uses the model's ``_no_split_modules`` class names (what accelerate uses to place whole blocks)
    and falls back to the largest ``nn.ModuleList``.
    """
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def freeze_first_layers(model, n: int) -> None:
    layers = decoder_layers(model)
    if n > len(layers):
        raise ConfigError(f"--num_freeze_layers: {n} exceeds the model's {len(layers)} decoder layers")
    for layer in layers[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)
    log(f"--> froze the first {n} of {len(layers)} decoder layers")
