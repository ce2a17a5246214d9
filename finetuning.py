"""Fine-tune a causal LM: ``python finetuning.py --help`` lists every option.

    python finetuning.py                                   # tiny bundled model, bundled Alpaca sample, CPU
    torchrun --nproc_per_node 8 finetuning.py --enable_fsdp --use_peft --peft_method lora --model_name ...
"""
import sys

from shardtune.finetuning import cli

if __name__ == "__main__":
    sys.exit(cli())
