"""PEFT method configs; each maps onto the matching ``peft`` config class."""
from dataclasses import dataclass
from typing import List

from shardtune.configs._field import doc


@dataclass
class lora_config:
    """LoRA adapters (--use_peft --peft_method lora), mapped onto peft's LoraConfig."""

    NEEDS = ("use_peft", "peft_method=lora")

    r: int = doc(8, "LoRA rank.", valid="[1, inf)")
    lora_alpha: int = doc(32, "LoRA scaling numerator (scale = lora_alpha / r).", valid="(0, inf)")
    target_modules: List[str] = doc(["q_proj", "v_proj"], "Module names that get adapters, e.g. "
                                    "q_proj,k_proj,v_proj,o_proj, or 'all-linear'.", factory=True)
    bias: str = doc("none", "'none' | 'all' | 'lora_only': which biases train. (In the reference this was not a "
                            "dataclass field, so overriding it had no effect.)",
                       choices=("none", "all", "lora_only"))
    task_type: str = doc("CAUSAL_LM", "PEFT task type: shardtune trains causal LMs only.", choices=("CAUSAL_LM",))
    lora_dropout: float = doc(0.05, "Dropout on the LoRA input.", valid="[0, 1)")
    inference_mode: bool = doc(False, "Build the adapter frozen (for inference only): refused when True, since "
                                       "training would then change nothing.")


@dataclass
class llama_adapter_config:
    """LLaMA-Adapter (--use_peft --peft_method llama_adapter), mapped onto peft's AdaptionPromptConfig."""

    NEEDS = ("use_peft", "peft_method=llama_adapter")

    adapter_len: int = doc(10, "Learned prompt tokens per adapted layer.", valid="[1, inf)")
    adapter_layers: int = doc(30, "Number of top decoder layers that get adapters (capped at the model's depth, "
                                  "with a warning).", valid="[1, inf)")
    task_type: str = doc("CAUSAL_LM", "PEFT task type: shardtune trains causal LMs only.", choices=("CAUSAL_LM",))


@dataclass
class prefix_config:
    """Prefix tuning (--use_peft --peft_method prefix), mapped onto peft's PrefixTuningConfig."""

    NEEDS = ("use_peft", "peft_method=prefix")

    num_virtual_tokens: int = doc(30, "Virtual prefix tokens per layer.", valid="[1, inf)")
    task_type: str = doc("CAUSAL_LM", "PEFT task type: shardtune trains causal LMs only.", choices=("CAUSAL_LM",))
