"""QLoRA decisions that need no GPU: which storage dtype FSDP needs, what is refused and with which line, and that
quantized weights are never cast. (Training on 4-bit / 8-bit weights runs in tests/gpu/test_quantization.py.)"""
from __future__ import annotations

import pytest
import torch

from shardtune.configs.parse import parse_cli, resolve_compile
from shardtune.configs.precision import frozen_dtype
from shardtune.errors import ConfigError
from shardtune.models.quantization import check_quantization, is_quantized


def _run(**kw):
    return parse_cli({"use_peft": True, "quantization": "4bit", **kw})


@pytest.mark.parametrize("precision, storage", [("bf16_mixed", torch.bfloat16), ("bf16_pure", torch.bfloat16),
                                                ("fp16_mixed", torch.float16), ("fp32", torch.float32)])
def test_fsdp_needs_4bit_storage_in_the_gather_dtype(precision, storage):
    """FSDP2 casts each parameter to the unit's gather dtype: packed 4-bit bytes survive only if they are stored
    in exactly that dtype. Every other float storage is refused in one line naming the dtype to use."""
    assert frozen_dtype(precision) == storage
    check_quantization(_run(**{"quantization_config.quant_storage": str(storage)}), precision, sharded=True)
    for other in (torch.bfloat16, torch.float16, torch.float32):
        if other != storage:
            with pytest.raises(ConfigError, match=f"must be stored as {str(storage)[6:]}") as err:
                check_quantization(_run(**{"quantization_config.quant_storage": str(other)}), precision, sharded=True)
            assert "\n" not in str(err.value)
        # one process: bitsandbytes computes from any storage dtype
        check_quantization(_run(**{"quantization_config.quant_storage": str(other)}), precision, sharded=False)


def test_fsdp_cpu_offload_with_4bit_is_refused():
    run = _run(enable_fsdp=True, **{"fsdp_config.fsdp_cpu_offload": True})
    with pytest.raises(ConfigError, match="--fsdp_config.fsdp_cpu_offload cannot be combined with --quantization"):
        check_quantization(run, "bf16_mixed", sharded=True)


def test_compile_auto_is_off_for_quantized_models():
    cuda = torch.device("cuda", 0)  # a torch.device only: nothing runs on it
    assert resolve_compile(parse_cli({}), cuda) is True
    assert resolve_compile(_run(), cuda) is False
    assert resolve_compile(_run(torch_compile="True"), cuda) is True


def test_quantized_parameters_are_never_cast():
    """UnitPlacer and the pure-bf16 cast leave bitsandbytes weights alone (their dtype is a storage view of packed
    bytes); every other parameter gets its dtype. Params4bit is recognised by class name, since bitsandbytes is an
    optional extra: the subclass below stands in for it (same name, a plain Parameter otherwise)."""
    from shardtune.policies.placement import UnitPlacer
    from shardtune.policies.mixed_precision import cast_parameters

    class Params4bit(torch.nn.Parameter):
        pass

    packed = Params4bit(torch.randn(8, 1).to(torch.bfloat16), requires_grad=False)
    norm = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    adapter = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    model = torch.nn.Module()
    model.packed, model.norm, model.adapter = packed, norm, adapter
    assert is_quantized(packed) and not is_quantized(norm)
    UnitPlacer("fp32", None, frozen_in_compute_dtype=True)(model.parameters())
    assert packed.dtype == torch.bfloat16 and adapter.dtype == torch.float32
    packed.data = packed.data.to(torch.float16)  # stored as float16 this time: bf16_pure must not touch it
    cast_parameters(model, "bf16_pure")
    assert packed.dtype == torch.float16 and norm.dtype == torch.bfloat16
