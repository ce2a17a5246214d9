"""Batching: samplers, packing and collators (see loader.build_dataloader)."""
