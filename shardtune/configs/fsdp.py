"""fsdp_config: how the model is sharded, its numerics under FSDP and how checkpoints are written.

The enums below carry the reference's (torch FSDP1) names so that ``--fsdp_config.sharding_strategy
HYBRID_SHARD`` and ``--fsdp_config.checkpoint_type FULL_STATE_DICT`` (or the reference's
``StateDictType.FULL_STATE_DICT``) work from the command line. They are our own enums so that reading a
config never imports FSDP.
"""
from dataclasses import dataclass
from enum import Enum

from shardtune.configs._field import doc


class ShardingStrategy(Enum):
    FULL_SHARD = "FULL_SHARD"          # params, grads and optimizer state sharded (ZeRO-3)
    SHARD_GRAD_OP = "SHARD_GRAD_OP"    # params kept gathered between forward and backward (ZeRO-2-like)
    NO_SHARD = "NO_SHARD"              # replicate everything (DDP-like)
    HYBRID_SHARD = "HYBRID_SHARD"      # shard inside a group, replicate across groups (HSDP)


class StateDictType(Enum):
    SHARDED_STATE_DICT = "SHARDED_STATE_DICT"  # torch.distributed.checkpoint, one file per rank, resumable
    FULL_STATE_DICT = "FULL_STATE_DICT"        # gathered on rank 0, written as a Hugging Face folder


@dataclass
class fsdp_config:
    """Sharding (FSDP2 under torchrun), its mesh and numerics, activation checkpointing, checkpoint type, optimizer."""

    mixed_precision: bool = doc(True, "Use mixed precision under FSDP (bf16 compute, fp32 master weights and fp32 "
                                      "gradient reduction) when the device supports bf16.", needs="precision=auto")
    use_fp16: bool = doc(False, "fp16 compute with a sharded gradient scaler instead of bf16.")
    sharding_strategy: ShardingStrategy = doc(ShardingStrategy.FULL_SHARD,
                                              "FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD.",
                                              needs="enable_fsdp")
    hsdp: bool = doc(False, "Build an explicit 2-D (replicate x shard) device mesh for HYBRID_SHARD from "
                            "sharding_group_size and replica_group_size.",
                    needs=("enable_fsdp", "fsdp_config.sharding_strategy=HYBRID_SHARD"))
    sharding_group_size: int = doc(0, "HSDP: ranks that shard one model replica.", valid="[0, inf)",
                                   needs=("enable_fsdp", "fsdp_config.hsdp"))
    replica_group_size: int = doc(0, "HSDP: number of replicas; sharding_group_size x replica_group_size must equal "
                                     "the world size.", valid="[0, inf)",
                                   needs=("enable_fsdp", "fsdp_config.hsdp"))
    checkpoint_type: StateDictType = doc(StateDictType.SHARDED_STATE_DICT,
                                         "SHARDED_STATE_DICT (torch.distributed.checkpoint, resumable) or "
                                         "FULL_STATE_DICT (a Hugging Face folder gathered on rank 0).")
    async_checkpoint: bool = doc(True, "Write the periodic checkpoints (--save_every_n_steps) of SHARDED_STATE_DICT "
                                       "in the background: training stops only while the weights and optimizer "
                                       "state are copied into host memory (kept for the next save: one copy of "
                                       "the local state in host memory), and the checkpoint is sealed once every "
                                       "rank's write has ended; the end of the run, a stop and every other "
                                       "checkpoint wait for it. False: synchronous, as every other checkpoint.",
                                 needs=("save_every_n_steps", "fsdp_config.checkpoint_type=SHARDED_STATE_DICT"))
    fsdp_activation_checkpointing: bool = doc(True, "Recompute layers in backward, sharded or not. Each "
                                                    "decoder layer's activations are recomputed (non-reentrant) in "
                                                    "every run: under FSDP, on one GPU and on CPU alike.")
    ac_every_n_layers: int = doc(0, "With fsdp_activation_checkpointing, which decoder layers recompute: 0 (auto) "
                                    "checkpoints the fewest layers that keep the step's estimated peak within the "
                                    "memory budget (ac_memory_fraction; every layer off CUDA); 1 every layer, as the "
                                    "reference; n every n-th layer. The choice and its estimate are logged at "
                                    "start (policies/activation_budget.py).", valid="[0, inf)",
                                 needs="fsdp_config.fsdp_activation_checkpointing")
    ac_memory_fraction: float = doc(0.0, "The automatic memory plan's budget (ac_every_n_layers 0, "
                                         "keep_gathered_layers -1). 0 (default): no more than the same step takes "
                                         "the conventional way (every layer checkpointed, the loss over whole "
                                         "logits, as the reference), so a run reserves no more than the reference "
                                         "would; f in (0, 1]: f of each GPU's memory, e.g. 0.5 to spend free "
                                         "memory on speed. Always capped by what is free at start.", valid="[0, 1]")
    keep_gathered_layers: int = doc(-1, "FULL_SHARD / HYBRID_SHARD: how many decoder layers, counted from the last, "
                                        "keep their gathered parameters from forward to backward instead of "
                                        "all-gathering them again in backward (less communication, a layer's full "
                                        "parameters in memory each). -1 (auto) keeps as many as the memory budget "
                                        "(ac_memory_fraction) leaves after activation checkpointing, all of them "
                                        "when they fit, only the last on one rank (nothing to communicate); n "
                                        "keeps the last n (the last layer always stays gathered: backward needs it "
                                        "first). SHARD_GRAD_OP keeps every layer.",
                                    valid="[-1, inf)", needs="enable_fsdp")
    fsdp_cpu_offload: bool = doc(False, "Keep sharded parameters, gradients and optimizer state in host memory "
                                        "(sharded GPU runs under torchrun with --enable_fsdp only; refused "
                                        "elsewhere).", needs="enable_fsdp")
    pure_bf16: bool = doc(False, "bf16 parameters, gradients and optimizer state (no fp32 master weights).")
    optimizer: str = doc("AdamW", "'AdamW' (torch, fused where supported) or 'anyprecision' (AnyPrecisionAdamW with "
                                  "bf16 moments; use with pure_bf16).", choices=("AdamW", "anyprecision"))
    use_kahan_summation: bool = doc(False, "anyprecision only: Kahan-compensated bf16 weight updates.",
                                   needs="fsdp_config.optimizer=anyprecision")
