"""Turn a training checkpoint into something plain Hugging Face code loads.

    python -m shardtune.model_checkpointing.convert --checkpoint DIR --output OUT [--model_name BASE]

* DIR: a checkpoint folder (``.../step_000120``) or a checkpoint root (its newest checkpoint is used).
* Full fine-tuning -> a Hugging Face folder (safetensors, config, tokenizer):
  ``AutoModelForCausalLM.from_pretrained(OUT)``.
* PEFT runs -> a PEFT adapter folder: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)``.
* BASE defaults to the run's --model_name (from the checkpoint's run_config.yaml); give it when the
  base model has moved. Sharded checkpoints hold only trained weights; frozen ones come from BASE.
* ``--dtype`` (default: the base checkpoint's dtype, as the training run's own export) casts the
  written weights of a full model; adapters keep their training dtype.

Runs in one process on the CPU, without torchrun: torch.distributed.checkpoint reads the shards of
any number of ranks into one unsharded model.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from shardtune.errors import ConfigError
from shardtune.utils.logging import warn


def _resolve_checkpoint(path: Path) -> Path:
    """The checkpoint folder to convert, verified against its manifest (one line if it fails)."""
    from shardtune.model_checkpointing import integrity
    from shardtune.model_checkpointing.layout import STATE_FILE, is_complete, latest_checkpoint

    if path.is_dir() and not (path / STATE_FILE).is_file():
        latest = latest_checkpoint(path)
        if latest is not None:
            path = latest
    if not is_complete(path):
        raise ConfigError(f"--checkpoint: {path} is not a complete checkpoint (a step_* folder with {STATE_FILE}) "
                          f"nor a folder holding one")
    verdict = integrity.verify(path)
    if verdict.problems:
        raise ConfigError(f"--checkpoint: {path} fails verification: {integrity.summary(verdict)}")
    if verdict.coverage is not integrity.Coverage.FULL:
        warn(f"{path} has no {integrity.MANIFEST} (an older version's checkpoint): {verdict.coverage.value} of it "
             f"verified")
    return path


def output_dtype(name: Optional[str], default: torch.dtype) -> torch.dtype:
    """--dtype of the converter and the merge helper: auto (``default``) | float32 | bfloat16 | float16."""
    if not name or name == "auto":
        return default
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"--dtype: expected auto | float32 | bfloat16 | float16, got {name!r}")
    return table[name]


def convert(checkpoint: Path, output: Path, model_name: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """Write the checkpoint's model (or adapter) to ``output``; returns ``output``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from shardtune.configs import precision as P
    from shardtune.configs.fsdp import StateDictType
    from shardtune.configs.parse import parse_cli
    from shardtune.model_checkpointing.export import export_pretrained
    from shardtune.model_checkpointing.layout import RUN_CONFIG_FILE, read_state
    from shardtune.model_checkpointing.weights import MODEL_DIR, quiet_single_process, stored_weight_names
    from shardtune.models.builder import WeightSource, build_model
    from shardtune.models.loading import ModelSource, load_model_config, load_tokenizer
    from shardtune.models.loss import CausalLMWithLoss
    from shardtune.policies.mixed_precision import cast_parameters

    checkpoint = _resolve_checkpoint(Path(checkpoint))
    info = read_state(checkpoint)
    overrides = {"config": str(checkpoint / RUN_CONFIG_FILE)}
    if model_name:
        overrides["model_name"] = model_name
    run = parse_cli(overrides, refuse_ineffective=False)
    t = run.train
    base_config = load_model_config(ModelSource.parse(t.model_name))
    base_dtype = getattr(base_config, "dtype", None) or torch.float32
    base_dtype = getattr(torch, base_dtype) if isinstance(base_dtype, str) else base_dtype
    out_dtype = output_dtype(dtype, base_dtype)
    ckpt_type = StateDictType[info["checkpoint_type"]]
    print(f"--> converting {checkpoint} (step {info['train_state']['step']}, {ckpt_type.name}, "
          f"{'PEFT ' + str(info.get('peft_method')) if info.get('use_peft') else 'full model'})")

    if ckpt_type is StateDictType.FULL_STATE_DICT:
        # Already a Hugging Face / PEFT folder in the training dtype: load it and write it in out_dtype.
        src = checkpoint / MODEL_DIR
        tokenizer = load_tokenizer(str(src))
        if info.get("use_peft"):
            import shutil

            from shardtune.utils.io import atomic_directory

            with atomic_directory(output) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            return Path(output)
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        return export_pretrained(lm, tokenizer, output, dtype=out_dtype)

    # SHARDED_STATE_DICT: rebuild the training model from the base, then read the trained weights.
    # The checkpoint holds the stored (master) weights: rebuild the training model in that precision.
    precision = P.checkpoint_mode(P.resolve(run, torch.device("cpu")))
    tokenizer = load_tokenizer(t.tokenizer_name or t.model_name)
    # The adapter's structure comes from --from_peft_checkpoint while that folder exists, else from the run's
    # PEFT config; the trained values come from the checkpoint either way.
    adapter = t.from_peft_checkpoint if t.from_peft_checkpoint and Path(t.from_peft_checkpoint).is_dir() else None
    lm = build_model(run, WeightSource(t.model_name, adapter), precision, torch.device("cpu"), tokenizer,
                     packing=False)
    model = CausalLMWithLoss(lm)
    cast_parameters(model, precision)
    # The checkpoint holds the weights that trained (frozen ones were not saved): read exactly those.
    stored = stored_weight_names(checkpoint)
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in stored}}
    missing = stored - set(state["model"])
    if missing:
        raise ConfigError(f"--checkpoint: {checkpoint} holds weights this model lacks (e.g. {sorted(missing)[0]}); "
                          f"is --model_name the run's base model?")
    with quiet_single_process():  # one process reads every rank's shards
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    out = export_pretrained(lm, tokenizer, output, dtype=None if info.get("use_peft") else out_dtype)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardtune.model_checkpointing.convert",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (step_*) or checkpoint root")
    parser.add_argument("--output", required=True, help="folder to write the Hugging Face model / PEFT adapter to")
    parser.add_argument("--model_name", default=None, help="base model (default: the run's --model_name)")
    parser.add_argument("--dtype", default="auto", help="auto (the base model's) | float32 | bfloat16 | float16")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        out = convert(Path(args.checkpoint), Path(args.output), args.model_name, args.dtype)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"--> wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
