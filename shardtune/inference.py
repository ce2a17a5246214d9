"""Generate text from a fine-tuned model.

    python -m shardtune.inference --model_name BASE [--peft_model ADAPTER] --prompt "..."
    python -m shardtune.inference --model_name CONVERTED_FOLDER --prompt "..."

BASE is a hub id or folder; ADAPTER a PEFT adapter folder (``<output_dir>/model`` of a PEFT run, or
the converter's output). A full fine-tune's ``<output_dir>/model`` (or a converted checkpoint) is
itself a model folder. ``--prompt_file`` reads one prompt per line. Greedy decoding unless
``--do_sample``. Runs on the GPU when there is one (bf16 if supported), else on the CPU in fp32.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

from shardtune.errors import ConfigError


def load_for_inference(model_name: str, peft_model: Optional[str] = None, device: Optional[torch.device] = None):
    """(model, tokenizer) ready for ``generate``: the base (or converted) model plus optional adapters, built
    by the same ``build_model`` as training (models/builder.py)."""
    from shardtune.configs.run import RunConfigs
    from shardtune.models.builder import WeightSource, build_model
    from shardtune.models.loading import ModelSource, load_model_config, load_tokenizer

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    load_model_config(ModelSource.parse(model_name))  # one-line error for a wrong path or a model that is no LM
    if peft_model and not (Path(peft_model) / "adapter_config.json").is_file():
        raise ConfigError(f"--peft_model: {peft_model} has no adapter_config.json (give a PEFT adapter folder; a "
                          f"full model folder goes to --model_name)")
    # bf16 weights on GPUs that have it (no master copy is needed without training), fp32 elsewhere.
    precision = "bf16_pure" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    # The adapter folder carries the tokenizer the run trained with (added tokens included).
    tok_src = peft_model if peft_model and (Path(peft_model) / "tokenizer_config.json").is_file() else model_name
    tokenizer = load_tokenizer(tok_src, "--peft_model" if tok_src == peft_model else "--model_name")
    run = RunConfigs()
    run.train.model_name, run.train.use_peft = model_name, bool(peft_model)
    model = build_model(run, WeightSource(model_name, peft_model), precision, device, tokenizer, packing=False,
                        trainable=False, adapter_flag="--peft_model")
    model.to(device).eval()
    return model, tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: List[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0) -> List[str]:
    """The continuation of every prompt (prompt text not included)."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        out = model.generate(**enc, **kwargs)
        outputs.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardtune.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name", required=True, help="base model, or a full fine-tuned / converted folder")
    parser.add_argument("--peft_model", default=None, help="PEFT adapter folder to apply to --model_name")
    parser.add_argument("--prompt", default=None, help="the prompt text")
    parser.add_argument("--prompt_file", default=None, help="a file with one prompt per line")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        if args.prompt is None and args.prompt_file is None:
            raise ConfigError("give --prompt TEXT or --prompt_file FILE")
        prompts = [args.prompt] if args.prompt is not None else [
            line for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        torch.manual_seed(args.seed)
        with contextlib.redirect_stdout(sys.stderr):  # build_model's log lines; stdout is for the generated text
            model, tokenizer = load_for_inference(args.model_name, args.peft_model)
        texts = generate(model, tokenizer, prompts, args.max_new_tokens, args.do_sample, args.temperature,
                         args.top_p)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for prompt, text in zip(prompts, texts):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
