"""How the model is sharded and computed under FSDP2: which modules are FSDP units (wrapping), in which
dtypes parameters are gathered and gradients reduced (mixed_precision), which layers recompute their
activations (activation_checkpointing), and the low-precision optimizer (anyprecision_optimizer).

``utils/fsdp_utils.shard_model`` applies them in that order.
"""
