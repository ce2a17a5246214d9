"""QLoRA on paper: the meta-device model given the weights bitsandbytes would give it, without bitsandbytes.

A quantized run loads its base model through transformers' bitsandbytes integration, which replaces every
``nn.Linear`` but the output layer (``lm_head``, kept for accuracy) by a 4-bit or 8-bit layer; embeddings, norms and
the output layer stay in the dtype the model is loaded in (the compute dtype: models/builder.py ``load_dtype``).
What such a weight takes (bitsandbytes 0.45-0.50, ``functional.quantize_4bit`` / ``int8_vectorwise_quant``):

* 4-bit (fp4 or nf4): two values a byte, packed into a ``(ceil(n / (2 * s)), 1)`` tensor of ``quant_storage``
  (itemsize s), plus its quantization state: one fp32 absmax per block of 64 values (1/16 byte a parameter);
  with ``use_double_quant`` those absmax are themselves quantized to one byte each, with one fp32 absmax per 256
  of them and a 256-entry fp32 code book (about 1/64 byte a parameter), plus the 16-entry code of the 4-bit type.
* 8-bit: one int8 a value, plus one fp32 scale per output row (``SCB``).

The quantization state is not a parameter: FSDP2 does not shard it (every rank keeps the whole of it, set on the
module by models/quantization.py ``prepare_for_sharding``), and the run's memory estimate does not see it; the plan
adds it to the parameters it prints. The weights themselves are replaced here, on the meta device, by tensors of
the packed shape and dtype, so that the run's own estimate (policies/activation_budget.py) counts them as it counts
bitsandbytes' on a GPU: models/quantization.py ``is_quantized`` knows a quantized weight by its class name.
"""
from __future__ import annotations

import math

import torch
from torch import nn

BLOCKSIZE = 64  # values per absmax block (bitsandbytes' default; transformers passes no other)
NESTED_BLOCKSIZE = 256  # absmax values per block of the second quantization (use_double_quant)
FP32 = 4


class Params4bit(nn.Parameter):
    """A packed 4-bit weight on the meta device: bitsandbytes.nn.Params4bit's shape, dtype and class name."""


class Int8Params(nn.Parameter):
    """An int8 weight on the meta device: bitsandbytes.nn.Int8Params's shape, dtype and class name."""


def quantization_state_bytes(numel: int, out_features: int, quantization: str, double_quant: bool) -> int:
    """The bytes one quantized weight keeps beside its packed values (module docstring)."""
    if quantization == "8bit":
        return out_features * FP32
    blocks = math.ceil(numel / BLOCKSIZE)
    if not double_quant:
        return blocks * FP32 + 16 * FP32
    return blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * FP32 + 256 * FP32 + 16 * FP32 + FP32  # + the offset


def quantize_on_meta(model: nn.Module, run) -> int:
    """Replace the weights bitsandbytes would quantize (every frozen ``nn.Linear`` but the output layer; the LoRA
    adapters train, so they are not among them) by meta tensors of the packed shape. Returns the bytes of their
    quantization state, which is not a parameter (module docstring)."""
    quantization = run.train.quantization
    q = run.quantization
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    state = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module is output or module.weight.requires_grad:
            continue
        n, out_features = module.weight.numel(), module.weight.shape[0]
        if quantization == "4bit":
            storage = q.quant_storage
            packed = torch.empty(((n + 1) // (2 * storage.itemsize), 1), dtype=storage, device="meta")
            module.weight = Params4bit(packed, requires_grad=False)
        else:
            module.weight = Int8Params(torch.empty(module.weight.shape, dtype=torch.int8, device="meta"),
                                       requires_grad=False)
        state += quantization_state_bytes(n, out_features, quantization, q.use_double_quant)
    return state
