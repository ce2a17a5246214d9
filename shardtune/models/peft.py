"""PEFT adapters: our config dataclasses -> ``peft`` configs, and wrapping the model."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError, first_line
from shardtune.models.loading import decoder_layers
from shardtune.utils.logging import log, warn


def build_peft_config(run: RunConfigs, model):
    """The ``peft`` config for train_config.peft_method."""
    from peft import AdaptionPromptConfig, LoraConfig, PrefixTuningConfig

    method = run.train.peft_method
    values = asdict(run.peft)
    if method == "lora":
        if values["target_modules"] == ["all-linear"]:
            values["target_modules"] = "all-linear"
        else:
            check_lora_targets(values["target_modules"], model)
        return LoraConfig(**values)
    if method == "llama_adapter":
        n_layers = len(decoder_layers(model))
        if values["adapter_layers"] > n_layers:
            warn(f"--llama_adapter_config.adapter_layers {values['adapter_layers']} exceeds the model's {n_layers} "
                 f"layers; using {n_layers}")
            values["adapter_layers"] = n_layers
        return AdaptionPromptConfig(**values)
    if method == "prefix":
        return PrefixTuningConfig(**values)
    raise ConfigError(f"--peft_method: unknown method {method!r}")


# The layer classes LoRA wraps as linear layers (peft: torch's Linear, transformers' Conv1D of GPT-2 and others).
LORA_LINEAR_CLASSES = ("Linear", "Conv1D")


def check_lora_targets(targets, model) -> None:
    """Every --lora_config.target_modules name is a module of ``model`` (which may live on the meta device)."""
    if targets == ["all-linear"]:
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()  # GPT-2's are Conv1D
                         if type(m).__name__ in LORA_LINEAR_CLASSES and "lm_head" not in n})
        raise ConfigError(f"--lora_config.target_modules: {', '.join(missing)} not in this model; its linear "
                          f"layers are: {', '.join(linear)} (or 'all-linear')")


def check_peft_inputs(run: RunConfigs, model_config) -> None:
    """Before anything is loaded or written: the adapter folder to continue from, and the LoRA target modules
    against the model config.json describes, built on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    t = run.train
    adapter = t.from_peft_checkpoint
    if adapter:
        path = Path(adapter).expanduser()
        looks_local = path.exists() or adapter.startswith(("/", ".", "~")) or adapter.count("/") > 1
        if looks_local and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"--from_peft_checkpoint: {adapter} is not a PEFT adapter folder (no "
                              "adapter_config.json there); give the folder a LoRA run saved, e.g. output/model")
    if t.peft_method != "lora":
        return
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built so: peft checks when it is loaded
        return
    check_lora_targets(run.peft.target_modules, model)


def check_peft_supported(run: RunConfigs, model_type: str) -> None:
    """Refuse combinations peft cannot do, before loading weights."""
    if run.train.use_peft and run.train.peft_method == "llama_adapter" and model_type not in _adaption_prompt_types():
        raise ConfigError(f"--peft_method llama_adapter: peft supports it for {', '.join(_adaption_prompt_types())} "
                          f"models, not {model_type!r}; use --peft_method lora")


def _adaption_prompt_types():
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    return sorted(TRANSFORMERS_MODEL_CONFIG)


def apply_peft(model, run: RunConfigs, adapter: Optional[str] = None, trainable: bool = True,
               flag: str = "--from_peft_checkpoint"):
    """Wrap ``model`` in a PeftModel: fresh adapters from the run's PEFT config, or those in the ``adapter``
    folder (--from_peft_checkpoint, or a resumed checkpoint's: models/builder.py: WeightSource). trainable=False
    loads the adapter for inference."""
    from peft import PeftModel, get_peft_model

    t = run.train
    if adapter:
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{flag}: cannot load an adapter from {adapter!r}: {first_line(exc)}") from None
        log(f"--> {'continuing from' if trainable else 'applying'} adapter {adapter}")
        if not trainable:
            return model
    else:
        model = get_peft_model(model, build_peft_config(run, model))
    if getattr(model.active_peft_config, "is_prompt_learning", False):
        model.base_model.register_forward_pre_hook(_keep_prefix_cache_unchanged, with_kwargs=True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"--> PEFT {t.peft_method}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.3f}%)")
    return model


def _keep_prefix_cache_unchanged(module, args, kwargs):
    """Prefix tuning hands the decoder its learned prefix as a key/value cache, which every attention layer
    extends in place with the sequence's keys and values. A layer run twice (activation checkpointing
    recomputes it in backward) would then see the prefix *and* the sequence as its past. Each layer's
    update here returns prefix + new keys/values without storing them, so every run of a layer sees
    the same prefix."""
    cache = kwargs.get("past_key_values")
    for layer in getattr(cache, "layers", None) or []:
        if getattr(layer, "keys", None) is None or getattr(layer, "_shardtune_read_only", False):
            continue

        def update(key_states, value_states, *args, _layer=layer, **kwargs):
            return (torch.cat([_layer.keys, key_states], dim=-2), torch.cat([_layer.values, value_states], dim=-2))

        layer.update = update
        layer._shardtune_read_only = True
    return None
