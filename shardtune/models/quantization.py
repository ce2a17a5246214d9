"""Quantized base weights (QLoRA): bitsandbytes 4-bit / 8-bit layers under LoRA, alone and with FSDP2.

What the rest of the run asks of a quantized model, and why:

* Storage dtype of the frozen weights (``utils.precision.frozen_dtype``). Everything except the LoRA adapters
  is frozen, so the non-quantized parts (embeddings, norms, output layer) are loaded in the compute dtype of
  the precision mode (bf16 for bf16_mixed): a weight that never gets an update needs no fp32 master copy. The
  adapters get the master dtype (fp32 under mixed precision) from peft.
* FSDP2 shards 4-bit weights as they are stored: bitsandbytes packs two 4-bit values per byte and, with
  ``quant_storage`` a float dtype, views the packed bytes as that dtype, so the weight is a float tensor FSDP
  can split. FSDP2 casts every parameter to the policy's ``param_dtype`` for the all-gather: if the packed
  storage dtype differs, that cast would turn packed bytes into garbage. So under FSDP ``quant_storage`` must
  equal the dtype the unit is all-gathered in (:func:`fsdp_storage_dtype`); the check is one line at start.
  Every parameter of a unit is then gathered in one dtype.
* The gathered weight is a plain tensor: FSDP2 drops the ``Params4bit`` subclass and its ``quant_state``.
  bitsandbytes' ``Linear4bit.forward`` restores the state from ``module.quant_state``;
  :func:`prepare_for_sharding` makes sure every layer has it before sharding.
* ``--low_cpu_fsdp``: the broadcast from rank 0 moves a state dict, and a 4-bit layer's state is not a
  parameter (absmax, code book, shapes live beside it). Every rank therefore loads the quantized model itself,
  straight onto its own GPU, quantized tensor by tensor as it is read. Each rank's host RSS then counts the
  memory-mapped checkpoint pages it read (12.8 / 15.4 GB per rank at 8B on 2 GPUs: benchmarks/README.md).
* 8-bit (``Int8Params``) weights cannot be sharded (int8 storage, row-wise statistics): refused with FSDP.
"""
from __future__ import annotations

import torch
from torch import nn

from shardtune.configs.quantization import dtype_name


def fsdp_storage_dtype(precision: str) -> torch.dtype:
    """The dtype FSDP2 all-gathers a frozen weight in; packed 4-bit storage must be exactly this."""
    from shardtune.configs.precision import frozen_dtype

    return frozen_dtype(precision)


def check_available() -> None:
    """--quantization runs on CUDA GPUs with the optional bitsandbytes package; one line otherwise."""
    import importlib.util

    from shardtune.errors import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("--quantization needs a CUDA GPU (bitsandbytes); drop --quantization to train on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--quantization needs bitsandbytes: pip install 'shardtune[quant]'")


def check_quantization(run, precision: str, sharded: bool) -> None:
    """Combinations that cannot work, as one line each, once the precision mode is known (before loading)."""
    from shardtune.errors import ConfigError

    t, q = run.train, run.quantization
    if not t.quantization:
        return
    if sharded and t.quantization == "4bit":
        want = fsdp_storage_dtype(precision)
        if q.quant_storage != want:
            raise ConfigError(
                f"--quantization_config.quant_storage {dtype_name(q.quant_storage)}: under FSDP with precision "
                f"{precision} the 4-bit weights must be stored as {dtype_name(want)}, the dtype FSDP gathers the "
                f"unit in (another dtype would be cast and the packed weights destroyed); set "
                f"--quantization_config.quant_storage {dtype_name(want)}")
        if run.fsdp.fsdp_cpu_offload:
            raise ConfigError("--fsdp_config.fsdp_cpu_offload cannot be combined with --quantization 4bit: moving "
                              "4-bit weights between host and GPU re-quantizes them; the 4-bit model is small enough "
                              "to stay on the GPU: drop --fsdp_cpu_offload")


def is_quantized(p: torch.Tensor) -> bool:
    """A bitsandbytes weight (4-bit packed or int8): its dtype says nothing about its values, never cast it."""
    return type(p).__name__ in ("Params4bit", "Int8Params")


def prepare_for_sharding(model: nn.Module) -> int:
    """Give every 4-bit layer its ``quant_state`` on the module, where bitsandbytes looks for it once FSDP2 has
    replaced the weight by a gathered plain tensor. Returns the number of 4-bit layers."""
    n = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            state = getattr(weight, "quant_state", None)
            if state is None:
                raise RuntimeError(f"4-bit layer {type(module).__name__} has no quant_state: it was not quantized "
                                   "(was the model loaded onto a GPU?)")
            module.quant_state = state
            n += 1
    return n
