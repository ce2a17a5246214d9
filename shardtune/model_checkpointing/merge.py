"""Merge a PEFT adapter into its base model and write one plain Hugging Face model folder.

    python -m shardtune.model_checkpointing.merge --adapter ADAPTER --output OUT [--model_name BASE] [--dtype bfloat16]

* ADAPTER: a PEFT adapter folder: ``<output_dir>/model`` of a PEFT run (QLoRA included), or the converter's
  output for a checkpoint.
* BASE: the *unquantized* base model (hub id, folder or .gguf); default: the adapter's
  ``base_model_name_or_path``. A QLoRA adapter trained on 4-bit weights merges into the full-precision base:
  merging into 4-bit weights would round the update away.
* The merge is computed in fp32 on the CPU (W + scale * B @ A rounded once), then written in ``--dtype``
  (default bfloat16). Needs host memory for the fp32 base (4 bytes per parameter).
* Checked when written: the folder's logits on a probe sequence equal those of base + adapter (within
  the written dtype's rounding), else nothing is left at OUT and the command fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from shardtune.errors import ConfigError, SaveError

# Relative logit tolerance of the written model against base + adapter, per written dtype: one rounding of
# every weight (bf16 keeps 8 mantissa bits).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def _base_of(adapter: Path) -> str:
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--adapter: {adapter} has no adapter_config.json (give a PEFT adapter folder, e.g. "
                          f"<output_dir>/model of a --use_peft run)") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"--adapter: {adapter}/adapter_config.json names no base model; give --model_name BASE")
    return base


def _probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def merge(adapter: Path, output: Path, model_name: Optional[str] = None, dtype: str = "bfloat16") -> Path:
    """Write base + adapter, merged, to ``output`` in ``dtype``; returns ``output``."""
    from transformers import AutoModelForCausalLM

    from shardtune.configs.run import RunConfigs
    from shardtune.model_checkpointing.convert import output_dtype
    from shardtune.model_checkpointing.export import export_model
    from shardtune.models.builder import WeightSource, build_model
    from shardtune.models.loading import ModelSource, load_model_config, load_tokenizer

    out_dtype = output_dtype(dtype, torch.bfloat16)
    adapter, output = Path(adapter), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output: {output} exists and is not empty; give a new folder (nothing is overwritten)")
    base = model_name or _base_of(adapter)
    src = ModelSource.parse(base)
    load_model_config(src)  # one line for a wrong path or a model that is not a causal LM
    # The adapter folder carries the tokenizer the run trained with (added tokens included).
    tokenizer = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else base)
    run = RunConfigs()  # the same build_model as training and inference: fp32 base on the CPU, adapter applied
    run.train.model_name, run.train.use_peft = base, True
    model = build_model(run, WeightSource(base, str(adapter)), "fp32", torch.device("cpu"), tokenizer,
                        packing=False, trainable=False, adapter_flag="--adapter")
    vocab = model.get_input_embeddings().weight.shape[0]
    probe = torch.arange(1, 33).remainder(vocab).unsqueeze(0)
    want = _probe_logits(model, probe)
    merged = model.merge_and_unload()
    got = _probe_logits(merged, probe)
    # Measured as the relative error of all logits, like the written model's check below: an element-wise bound
    # failed a real merge (SmolLM2 + a QLoRA adapter: logits ~20 moved by 0.0067 at most, relative error ~1e-6),
    # since folding B @ A into W rounds each weight once in fp32.
    merge_err = ((got - want).norm() / want.norm()).item()
    if not merge_err <= TOLERANCE[torch.float32]:
        raise SaveError(f"merging {adapter} into {base} changed the model's output (relative logit error "
                        f"{merge_err:.3g} > {TOLERANCE[torch.float32]}); nothing written")
    print(f"--> merged {adapter} into {base}; writing {str(out_dtype).removeprefix('torch.')} to {output}")
    merged.to(out_dtype)  # the model's own dtype is what config.json records
    export_model(merged, merged.state_dict(), output, tokenizer, dtype=out_dtype)
    written = AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32)
    err = ((_probe_logits(written, probe) - want).norm() / want.norm()).item()
    if not err <= TOLERANCE[out_dtype]:
        import shutil

        shutil.rmtree(output, ignore_errors=True)
        raise SaveError(f"the merged model written to {output} does not reproduce base + adapter (relative logit "
                        f"error {err:.3g} > {TOLERANCE[out_dtype]} for {out_dtype}); removed it")
    print(f"--> checked: the written model's logits match base + adapter (relative error {err:.2g})")
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardtune.model_checkpointing.merge",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (<output_dir>/model of a PEFT run)")
    parser.add_argument("--output", required=True, help="folder to write the merged Hugging Face model to")
    parser.add_argument("--model_name", default=None, help="unquantized base model (default: the adapter's base)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default; also 'auto') | float16 | float32")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        out = merge(Path(args.adapter), Path(args.output), args.model_name, args.dtype)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"--> wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
