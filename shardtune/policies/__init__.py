"""How the model is sharded and computed: FSDP units (wrapping), gather / reduce dtypes (mixed_precision),
activation checkpointing, torch.compile per layer, quantized (QLoRA) base weights, and AnyPrecisionAdamW."""
