"""From tokenised samples to batches: samplers, packing into context_length blocks, collators and the
data loaders (``loader.build_dataloader``)."""
