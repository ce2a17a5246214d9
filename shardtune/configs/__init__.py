"""The run's typed configuration: one dataclass per config (train, fsdp, PEFT methods, data sets, wandb,
quantization); each field's default, type, valid range and help text are the command line's schema."""
from shardtune.configs.datasets import alpaca_dataset, chat_dataset, custom_dataset, grammar_dataset, samsum_dataset
from shardtune.configs.fsdp import ShardingStrategy, StateDictType, fsdp_config
from shardtune.configs.peft import llama_adapter_config, lora_config, prefix_config
from shardtune.configs.quantization import quantization_config
from shardtune.configs.training import train_config
from shardtune.configs.wandb import wandb_config

PEFT_CONFIGS = {"lora": lora_config, "llama_adapter": llama_adapter_config, "prefix": prefix_config}
DATASET_CONFIGS = {c.__name__: c for c in (alpaca_dataset, grammar_dataset, samsum_dataset, custom_dataset,
                                           chat_dataset)}

__all__ = ["train_config", "fsdp_config", "lora_config", "llama_adapter_config", "prefix_config",
           "wandb_config", "quantization_config", "ShardingStrategy", "StateDictType", "PEFT_CONFIGS",
           "DATASET_CONFIGS", *DATASET_CONFIGS]
