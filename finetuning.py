"""Fine-tune a causal LM: ``python finetuning.py --help`` lists every option.

    python finetuning.py                                   # tiny bundled model, bundled Alpaca sample, CPU
    torchrun --nproc_per_node 8 finetuning.py --enable_fsdp --use_peft --peft_method lora --model_name ...
    shardtune run --nproc_per_node 8 --enable_fsdp ...     # the same, with one exit status for the job
"""
import sys

from shardtune.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
