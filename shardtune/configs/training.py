"""train_config: the run itself (model, data, optimisation, outputs).

Field names and defaults follow llama-recipes' ``train_config`` so that existing commands work.
Where we differ, the field's help says so and why.
"""
from dataclasses import dataclass
from typing import Optional

from shardtune.configs._field import doc
from shardtune.configs.paths import BUNDLED_MODEL_DIR


@dataclass
class train_config:
    """The run itself: model, data, batching, optimisation, precision, PEFT switch, outputs and checkpoints."""

    # ---- model -------------------------------------------------------------------------------
    model_name: str = doc(str(BUNDLED_MODEL_DIR),
                          "Hugging Face hub id or local directory of a causal LM. Default: the tiny Llama that "
                          "ships inside the package (the reference's default was the placeholder 'PATH/to/Model').")
    tokenizer_name: Optional[str] = doc(None, "Tokenizer hub id or directory; defaults to model_name.")
    use_fast_kernels: bool = doc(False, "With --attn_implementation auto: use flash_attention_2 when the flash-attn "
                                        "package is installed (otherwise the auto choice stands: FlexAttention for "
                                        "packed batches on GPUs, SDPA elsewhere). The choice is logged.",
                                 needs="attn_implementation=auto")
    attn_implementation: str = doc("auto", "auto | sdpa | flex_attention | eager | flash_attention_2. 'auto': "
                                           "flex_attention on CUDA GPUs with packing (packed documents kept apart by "
                                           "a sparse block mask in one compiled kernel; SDPA with an explicit mask "
                                           "loses its flash kernel), flash_attention_2 with --use_fast_kernels when "
                                           "flash-attn is installed, sdpa on CPU, for padded batches and for prefix "
                                           "tuning. Logged at start.",
                                choices=("auto", "sdpa", "flex_attention", "eager", "flash_attention_2"))
    torch_compile: str = doc("auto", "auto | True | False: torch.compile each decoder layer (the first steps pay the "
                                     "compile time). 'auto': on for CUDA GPUs, off on CPU and with --quantization.",
                             choices=("auto", "True", "False"))
    quantization: Optional[str] = doc(None, "'4bit' or '8bit' bitsandbytes quantization of the frozen base model "
                                             "under LoRA (QLoRA; needs the optional bitsandbytes package and a CUDA "
                                             "GPU). 4bit also under FSDP; settings in quantization_config.",
                                      choices=("4bit", "8bit"))
    # ---- distributed -------------------------------------------------------------------------
    enable_fsdp: bool = doc(False, "Shard the model with FSDP (run under torchrun).")
    low_cpu_fsdp: bool = doc(False, "With FSDP: only rank 0 reads the weights; the other ranks build the model on "
                                    "the meta device and receive the weights by broadcast.", needs="enable_fsdp")
    freeze_layers: bool = doc(False, "Freeze the first num_freeze_layers decoder layers (full fine-tuning; PEFT "
                                     "already freezes the base model).", needs="not use_peft")
    num_freeze_layers: int = doc(1, "How many decoder layers freeze_layers freezes, counted from the input.",
                                 valid="[1, inf)", needs="freeze_layers")
    freeze_LLM_only: bool = doc(False, "The reference's switch for vision models (mllama): freeze the language model "
                                       "except its cross-attention layers.",
                                unsupported="shardtune fine-tunes text-only causal LMs; use --freeze_layers or "
                                            "--use_peft to train part of a model")
    # ---- data --------------------------------------------------------------------------------
    dataset: str = doc("alpaca_dataset", "Data set name: alpaca_dataset, grammar_dataset, samsum_dataset, "
                                         "custom_dataset or chat_dataset. Default alpaca_dataset on the bundled "
                                         "sample (the reference defaults to samsum_dataset, which needs a download).")
    batching_strategy: str = doc("packing", "'packing' (documents concatenated into context_length blocks, "
                                            "attention masked per document) or 'padding' (length-grouped, padded "
                                            "batches).", choices=("packing", "padding"))
    context_length: int = doc(4096, "Packing block length; with padding, samples are truncated to it.",
                              valid="[1, inf)")
    batch_size_training: int = doc(4, "Micro-batch size per process.", valid="[1, inf)")
    val_batch_size: int = doc(1, "Evaluation batch size per process.", valid="[1, inf)",
                              needs="run_validation")
    num_workers_dataloader: int = doc(1, "DataLoader worker processes (0 loads in the main process).", valid="[0, inf)")
    # ---- optimisation ------------------------------------------------------------------------
    num_epochs: int = doc(3, "Passes over the training data.", valid="[1, inf)")
    max_train_step: int = doc(0, "Stop after this many optimizer steps in total (0: no limit). The reference "
                                 "counted micro-batches and dropped a half-accumulated step.", valid="[0, inf)")
    max_eval_step: int = doc(0, "Evaluate on at most this many batches per evaluation (0: all).", valid="[0, inf)",
                            needs="run_validation")
    gradient_accumulation_steps: int = doc(1, "Micro-batches per optimizer step. The loss is token-weighted over "
                                              "the whole step, so bs=2 x 4 equals bs=8 x 1.", valid="[1, inf)")
    gradient_clipping: bool = doc(False, "Clip the global gradient norm.")
    gradient_clipping_threshold: float = doc(1.0, "Max global gradient norm when gradient_clipping is on.",
                                             valid="(0, inf)", needs="gradient_clipping")
    max_nonfinite_steps: int = doc(0, "Optimizer steps whose loss or gradient norm is not finite that may be skipped "
                                      "(each is logged) before the run stops as diverged; 0: stop at the first.",
                                   valid="[0, inf)")
    divergence_factor: float = doc(3.0, "Stop the run as diverged (exit status 1, nothing saved after it) when the "
                                        "smoothed training loss (token-weighted, over about 10 steps) exceeds this "
                                        "many times the first step's loss; 0: off, else > 1. Fine-tuning lowers the "
                                        "loss, so a healthy run stays far below 3x; a too-high --lr goes above it "
                                        "within a few steps.", valid="[0, inf)")
    divergence_patience_steps: int = doc(0, "Also stop as diverged when the smoothed training loss has not fallen "
                                            "below its best for this many optimizer steps; 0: off (the default: a "
                                            "healthy run may plateau, for how long depends on its data and "
                                            "length).", valid="[0, inf)")
    lr: float = doc(1e-4, "AdamW learning rate.", valid="(0, inf)")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay.", valid="[0, inf)")
    gamma: float = doc(0.85, "StepLR: the learning rate is multiplied by gamma after every epoch.", valid="(0, 1]")
    seed: int = doc(42, "Seed for model init, data order and dropout.", valid="[0, 4294967296)")
    # ---- precision ---------------------------------------------------------------------------
    precision: str = doc("auto", "Numerics: auto | fp32 | bf16_mixed | fp16_mixed | bf16_pure. 'auto' picks "
                                 "bf16_mixed (fp32 master weights, bf16 compute) on GPUs with bf16 and fp32 on CPU; "
                                 "use_fp16 and fsdp_config.pure_bf16 select fp16_mixed / bf16_pure as in the "
                                 "reference.", choices=("auto", "fp32", "bf16_mixed", "fp16_mixed", "bf16_pure"))
    use_fp16: bool = doc(False, "fp16 mixed precision with a gradient scaler (same as precision=fp16_mixed).")
    mixed_precision: bool = doc(True, "Allow mixed precision under precision=auto; False keeps fp32. (Dead in the "
                                      "reference; here it has the same meaning as fsdp_config.mixed_precision and "
                                      "both must be True.)", needs="precision=auto")
    # ---- PEFT --------------------------------------------------------------------------------
    use_peft: bool = doc(False, "Train a PEFT adapter instead of all weights.")
    peft_method: str = doc("lora", "lora | llama_adapter | prefix.", needs="use_peft")
    from_peft_checkpoint: str = doc("", "Adapter folder to continue training from.", needs="use_peft")
    # ---- evaluation, outputs and checkpoints -------------------------------------------------
    run_validation: bool = doc(True, "Evaluate after every epoch; the best eval loss decides which checkpoint is "
                                     "'best'.")
    output_dir: str = doc("output", "Where adapters, full models, metrics and the resolved config are written "
                                    "(the reference's default was the placeholder 'PATH/to/save/PEFT/model').")
    save_model: bool = doc(True, "Save the trained adapter / model.")
    save_optimizer: bool = doc(False, "Ignored: every checkpoint holds the optimizer state.",
                               deprecated="every checkpoint already holds the optimizer state, so that it resumes "
                                          "exactly")
    dist_checkpoint_root_folder: str = doc("", "Root folder of FSDP checkpoints; default '<output_dir>/checkpoints' "
                                               "(the reference's default was a placeholder path).",
                                       needs="save_model or save_every_n_steps")
    dist_checkpoint_folder: str = doc("fine-tuned", "Sub-folder name of FSDP checkpoints. The model name is never "
                                                    "pasted into it.", needs="save_model or save_every_n_steps")
    save_every_n_steps: int = doc(0, "Also save a resumable checkpoint every N optimizer steps (0: per epoch only).",
                                  valid="[0, inf)")
    keep_last_n_checkpoints: int = doc(2, "Keep exactly the newest N checkpoints of this run (plus the best-eval one).",
                                       valid="[1, inf)", needs="save_model or save_every_n_steps")
    resume_from: str = doc("", "Checkpoint folder to resume from, or 'auto' for the newest checkpoint of the run that "
                               "owns output_dir that passes verification against its manifest (one that fails is "
                               "skipped with a warning naming the file; none passing: refused). A folder named here "
                               "that fails is refused.")
    resume_unverified: bool = doc(False, "Only meaningful with --resume_from DIR (refused with auto or without "
                                         "--resume_from): resume that checkpoint although it has no manifest.json "
                                         "(written before checksums existed, or its manifest was deleted), so "
                                         "nothing of it is verified. A checkpoint with a manifest is verified "
                                         "anyway.", needs="resume_from")
    overwrite_output_dir: bool = doc(False, "Start afresh in an output_dir that holds an earlier run's model or "
                                            "checkpoints, deleting them (without it such a run stops with one line).")
    save_metrics: bool = doc(True, "Append per-step and per-epoch metrics to <output_dir>/metrics_<time>.jsonl and "
                                   "redraw their PNG plots in <output_dir>/plots/ at each evaluation and at the end "
                                   "(rank 0; plots need matplotlib). --save_metrics False turns them off.")
    # ---- observability -----------------------------------------------------------------------
    log_every_n_steps: int = doc(1, "Print one metrics line every N optimizer steps (rank 0).", valid="[1, inf)")
    peak_tflops: float = doc(0.0, "Accelerator dense bf16 peak in TFLOP/s for MFU (0: look it up from the device "
                                  "name).", valid="[0, inf)")
    flop_counter: bool = doc(False, "Count the FLOPs of one training step with torch.utils.flop_counter.")
    flop_counter_start: int = doc(3, "Warm-up steps before the FLOP-counted step.", valid="[0, inf)",
                                 needs="flop_counter")
    use_profiler: bool = doc(False, "Profile with torch.profiler and write TensorBoard traces.")
    profiler_dir: str = doc("", "Where profiler traces go; default '<output_dir>/profiler' (the reference's default "
                                "was a placeholder path).", needs="use_profiler")
    profiler_wait: int = doc(1, "Profiler schedule: optimizer steps skipped before profiling starts.",
                             valid="[0, inf)", needs="use_profiler")
    profiler_warmup: int = doc(2, "Profiler schedule: steps traced but discarded (warm-up) before recording.",
                               valid="[0, inf)", needs="use_profiler")
    profiler_active: int = doc(3, "Profiler schedule: steps recorded into the trace (once per run).",
                               valid="[1, inf)", needs="use_profiler")
    use_wandb: bool = doc(False, "Log to Weights & Biases (optional extra: pip install 'shardtune[tracking]').")
    use_tensorboard: bool = doc(False, "Write TensorBoard event files under <output_dir>/tensorboard (optional "
                                       "extra: pip install 'shardtune[tracking]').")
    dist_timeout_s: Optional[float] = doc(None, "Seconds a collective waits for the other ranks before the job "
                                                "fails, naming the rank that stopped answering (default 300, or "
                                                "$SHARDTUNE_PG_TIMEOUT_S).", valid="(0, inf)",
                                            needs="enable_fsdp")
    debug: bool = doc(False, "On an error, print the full Python traceback (default: one line naming the flag or "
                             "file and what would be valid).")
    one_gpu: bool = doc(False, "Ignored.", deprecated="dead field in the reference; a single process without "
                                                      "--enable_fsdp already uses one GPU")
