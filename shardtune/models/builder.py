"""``build_model``: the one way a model is built from a run's config, for training, for the converter and for
inference: load (models/loading.py), fit the embedding to the tokenizer, freeze, add PEFT adapters.

Where the weights come from is run state, not config (``WeightSource``): a resumed FULL_STATE_DICT
checkpoint supplies the model folder or the adapter, and the user's config stays as it was given, so the
run_config.yaml of every later checkpoint still says what the user asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from shardtune.configs.run import RunConfigs


@dataclass(frozen=True)
class WeightSource:
    """The base weights (a folder, hub id or .gguf) and an optional adapter folder to continue from."""

    model: str
    adapter: Optional[str] = None

    @classmethod
    def for_run(cls, run: RunConfigs, resume=None) -> "WeightSource":
        """--model_name and --from_peft_checkpoint, unless a FULL_STATE_DICT checkpoint being resumed holds
        the model (full fine-tuning) or the adapter (PEFT) itself (model_checkpointing.resume.ResumePoint)."""
        t = run.train
        model = str(resume.model_dir) if resume is not None and resume.model_dir else t.model_name
        adapter = str(resume.adapter_dir) if resume is not None and resume.adapter_dir else t.from_peft_checkpoint
        return cls(model, adapter or None)


def load_dtype(run: RunConfigs, precision: str, dist_info, source: WeightSource,
               checkpoint_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype the weights are read in; None: the precision mode's master dtype (configs/precision.py).

    * Quantized base (QLoRA): everything but the adapters is frozen, so it is stored in the compute dtype.
    * Sharded on GPUs (no --low_cpu_fsdp, no CPU offload, the base checkpoint itself): the checkpoint's own
      dtype; shard_model upcasts one FSDP unit at a time on the GPU, so no rank holds an fp32 copy of the whole
      model in host memory.
    """
    t = run.train
    if t.quantization:
        from shardtune.configs.precision import frozen_dtype

        return frozen_dtype(precision)
    upcast_on_gpu = (t.enable_fsdp and dist_info.distributed and dist_info.device.type == "cuda"
                     and not t.low_cpu_fsdp and not run.fsdp.fsdp_cpu_offload and source.model == t.model_name)
    return checkpoint_dtype if upcast_on_gpu else None


def build_model(run: RunConfigs, source: WeightSource, precision: str, device: torch.device, tokenizer, *,
                meta: bool = False, packing: bool = True, dtype: Optional[torch.dtype] = None, bnb_config=None,
                trainable: bool = True, adapter_flag: str = "--from_peft_checkpoint") -> torch.nn.Module:
    """The causal LM of ``run`` (a PeftModel with --use_peft), its weights in ``precision``'s master dtype
    (or ``dtype``), on the CPU (or on ``device`` when quantized). Sharding and moving to the device are the
    caller's (policies/fsdp.py).

    meta=True: the architecture on the meta device, no weights read (low_cpu_fsdp ranks other than 0; rank 0
    broadcasts the weights after sharding). trainable=False: adapters are loaded for inference only;
    adapter_flag: the option an error about the adapter folder names.
    """
    from shardtune.models.loading import freeze_first_layers, load_model, maybe_resize_embeddings

    t = run.train
    lm = load_model(source.model, precision, device, use_fast_kernels=t.use_fast_kernels, bnb_config=bnb_config,
                    meta=meta, attn_implementation=t.attn_implementation,
                    prompt_learning=t.use_peft and t.peft_method == "prefix", packing=packing, dtype=dtype)
    if not meta:
        maybe_resize_embeddings(lm, tokenizer)
    elif len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:  # shapes only: rank 0 broadcasts values
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if t.freeze_layers and not t.use_peft:
        freeze_first_layers(lm, t.num_freeze_layers)
    if t.use_peft:
        from shardtune.models.peft import apply_peft

        lm = apply_peft(lm, run, source.adapter, trainable=trainable, flag=adapter_flag)
    return lm


__all__ = ["WeightSource", "build_model"]
