"""How the model is sharded and computed: FSDP units (wrapping), gather / reduce dtypes (mixed_precision),
activation checkpointing, torch.compile per layer, and the low-precision AnyPrecisionAdamW optimizer."""
