"""quantization_config: bitsandbytes settings used when train_config.quantization is set (QLoRA;
models/quantization.py says what a quantized run changes)."""
from dataclasses import dataclass

import torch

from shardtune.configs._field import doc


@dataclass
class quantization_config:
    """bitsandbytes settings of the 4-bit base model (with --quantization 4bit; 8-bit takes no settings)."""

    NEEDS = ("quantization=4bit",)

    quant_type: str = doc("fp4", "4-bit data type: 'fp4' or 'nf4'.", choices=("fp4", "nf4"))
    compute_dtype: torch.dtype = doc(torch.bfloat16, "Compute dtype of the 4-bit layers (bfloat16, float16 or "
                                                     "float32).", choices=("bfloat16", "float16", "float32"))
    use_double_quant: bool = doc(False, "Quantize the quantization constants too.")
    quant_storage: torch.dtype = doc(torch.bfloat16, "Dtype the packed 4-bit weights are stored as: bfloat16, "
                                                     "float16, float32 or uint8. Under FSDP it must be the dtype the "
                                                     "unit is gathered in (bfloat16 for the default bf16 precision, "
                                                     "float32 for --precision fp32); checked at start.",
                                         choices=("bfloat16", "float16", "float32", "uint8"))

    def create_bnb_config(self, quantization: str):
        """BitsAndBytesConfig for '4bit' / '8bit'. Raises ValueError for anything else."""
        from transformers import BitsAndBytesConfig

        if quantization == "4bit":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                      bnb_4bit_compute_dtype=self.compute_dtype,
                                      bnb_4bit_use_double_quant=self.use_double_quant,
                                      bnb_4bit_quant_storage=self.quant_storage)
        if quantization == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        raise ValueError(f"--quantization must be '4bit' or '8bit', got {quantization!r}")


PEFT_METHODS = ("lora",)  # the adapters tested on quantized weights (tests/gpu/test_quantization.py)



def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
