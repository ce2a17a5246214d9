"""``main``: build the parts of a run in the order the run uses them, then train.

    configs (configs/) -> inputs checked (models/loading.py, datasets/) -> processes, device, precision
    (utils/distributed.py, configs/precision.py) -> output folder and resume point (model_checkpointing/)
    -> data (datasets/, data/) -> model (models/) -> wrap (policies/) -> optimizer (policies/optimizer.py)
    -> observers (observability/) -> checkpointer (model_checkpointing/) -> loop (training/)

Every check that can fail on user input runs before the model's weights are loaded (data comes before the
model for that reason: a bad data file is found in seconds, not after loading 70B weights), and before anything is
written into the output folder.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from shardtune.configs import precision as P
from shardtune.configs.help import format_changed_settings
from shardtune.configs.parse import parse_cli, resolve_compile, save_resolved
from shardtune.configs.presets import DEMO_PRESET
from shardtune.configs.run import RunConfigs
from shardtune.data.loader import build_dataloader, check_batch_fits, is_packed
from shardtune.datasets import get_custom_data_collator, get_preprocessed_dataset
from shardtune.errors import ConfigError
from shardtune.model_checkpointing.checkpoint import Checkpointer, ExportSettings
from shardtune.model_checkpointing.output_dir import (RunDir, claim_output_dir, lock_new_output_dir, release_locks,
                                                     start_run)
from shardtune.model_checkpointing.resume import ResumePoint, find_resume_point
from shardtune.model_checkpointing.weights import TrainedObjects
from shardtune.models import quantization
from shardtune.models.builder import WeightSource, build_model, load_dtype
from shardtune.models.loading import (ModelSource, check_against_model_config, check_weight_files,
                                      load_model_config, load_tokenizer)
from shardtune.models.loss import CausalLMWithLoss
from shardtune.models.peft import check_peft_inputs, check_peft_supported
from shardtune.observability.flops import FlopCounter, count_model_flops
from shardtune.observability.metrics import MetricsWriter
from shardtune.observability.mfu import peak_tflops_for
from shardtune.observability.phases import PhaseTimer
from shardtune.observability.profiler import build_profiler, check_profiler_config
from shardtune.observability.trackers import build_trackers, check_trackers
from shardtune.policies.activation_checkpointing import checkpointed_fraction
from shardtune.policies.compile import compile_decoder_layers
from shardtune.policies.fsdp import check_fsdp_config, wrap_model
from shardtune.policies.mixed_precision import autocast, grad_scaler
from shardtune.policies.optimizer import build_lr_scheduler, build_optimizer
from shardtune.training.context import StepNumerics, Telemetry, TrainContext
from shardtune.training.loop import train
from shardtune.training.preemption import StopRequest
from shardtune.utils import distributed
from shardtune.utils.disk import guard_saves, warn_if_low_disk
from shardtune.utils.distributed import DistInfo, configure_cuda_allocator
from shardtune.utils.io import atomic_write_text, remove_new_files_on_error
from shardtune.utils.logging import log
from shardtune.utils.rng import seed_everything


def main(**kwargs) -> dict:
    phases = PhaseTimer()  # wall time by phase, from the process' launch (observability/phases.py)
    run = parse_cli(kwargs)  # every flag and config file checked: one line and exit 2 on bad input
    t = run.train
    model_config, tokenizer = check_inputs(run)
    dist_info, precision = start_processes(run)
    out = claim_output(run, dist_info)
    # A data error removes the tokenised cache it may have written: rejected input leaves the folder as it was.
    with (remove_new_files_on_error(out.path, ConfigError) if dist_info.is_main else contextlib.nullcontext(),
          phases.time("data")):
        train_loader, eval_loader = build_data(run, tokenizer, dist_info)
    record_settings(run, out, dist_info)  # every input is checked: the run's first file is written now

    with phases.time("model"):
        lm, export_dtype = build_lm(run, out.resume, model_config, tokenizer, dist_info, precision,
                                    packing=is_packed(train_loader))
        model = CausalLMWithLoss(lm)
        if resolve_compile(run, dist_info.device):
            compile_decoder_layers(model)
        # Shard with FSDP2 under torchrun, else move to the device; activation checkpointing either way.
        model, sync_fn = wrap_model(model, run, dist_info, precision, on_device=t.quantization is not None)
        optimizer = build_optimizer(model, run, dist_info.device)
        lr_scheduler = build_lr_scheduler(optimizer, run)
        scaler = grad_scaler(precision, dist_info.device)

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(release_locks)
        # Leaving the process group waits for every rank (a barrier): only on success. A failing run leaves it
        # through shardtune/cli.py, which must not wait for ranks that may be gone.
        cleanup.push(lambda failed, *_: None if failed else distributed.cleanup())
        observers, metrics, model_flops, peak_tflops = build_observers(run, model, dist_info, out.path, cleanup)
        # Resumable checkpoints (every --save_every_n_steps and per epoch) and the exported model / adapter
        # (<output_dir>/model); resuming restores model, optimizer, scheduler, progress and RNG.
        checkpointer = Checkpointer(run, TrainedObjects(model, lm, optimizer, lr_scheduler, scaler),
                                    ExportSettings(tokenizer, export_dtype), out.run_id, dist_info)
        # Exports happen inside a checkpoint save (and on resuming an interrupted one): timed as a phase of their own
        checkpointer.export = phases.timed("export", checkpointer.export)
        distributed.on_rank0(lambda: start_run(run, out.run_dir, out.run_id), "record the run")
        check_disk(run, model, checkpointer, export_dtype, dist_info)
        with phases.time("model"):  # resuming: the checkpoint's weights and optimizer state
            state, restore_rng = checkpointer.load(out.resume) if out.resume else (None, None)
        if out.resume:
            checkpointer.finish_interrupted_export(out.resume)  # a run killed while exporting its model
            if already_finished(run, state, out.resume):
                return {"steps": state.step, "already_finished": True}
        numerics = StepNumerics(autocast=autocast(precision, dist_info.device, t.enable_fsdp and dist_info.distributed),
                                scaler=scaler, set_gradient_sync=sync_fn)
        telemetry = Telemetry(metrics=metrics, observers=observers, model_flops=model_flops, peak_tflops=peak_tflops,
                              phases=phases)
        ctx = TrainContext(run=run, device=dist_info.device, numerics=numerics, telemetry=telemetry,
                           # a full disk during a save: one line, no temporary folders left (utils/disk.py)
                           save_checkpoint=guard_saves(checkpointer, [checkpointer.root, out.path]),
                           restore_rng=restore_rng, stop_request=StopRequest())
        # SIGTERM / SIGINT from here on: finish the step, checkpoint, exit 75
        with ctx.stop_request, phases.watching_compiles():
            summary = train(model, train_loader, eval_loader, optimizer, lr_scheduler, ctx, state=state)
        summary.update({"flop_counter": obs.result for obs in observers if getattr(obs, "result", None)})
        if metrics.path is not None:
            summary["metrics_file"] = str(metrics.path)
        summary["phases_s"] = phases.summary()
        write_summary(summary, out.path, dist_info)
        if dist_info.is_main:
            log(phases.format_line(summary["phases_s"]))
    return summary


def check_inputs(run: RunConfigs) -> Tuple[Any, Any]:
    """Everything about the model, tokenizer and optional packages that can fail on user input, read cheaply
    (config.json and the safetensors headers, not the weights). Returns the model's config and the tokenizer."""
    t = run.train
    if distributed.env_world_size() > 1 and not t.enable_fsdp:
        raise ConfigError(f"launched with {distributed.env_world_size()} processes but without --enable_fsdp: "
                          "add --enable_fsdp to shard the model (or run one process)")
    if t.quantization:
        quantization.check_available()  # a CUDA GPU and bitsandbytes
    check_trackers(run)  # --use_wandb / --use_tensorboard without the 'tracking' extra
    check_profiler_config(run)
    model_source = ModelSource.parse(t.model_name)
    model_config = load_model_config(model_source)
    check_weight_files(model_source)  # truncated or corrupt safetensors, a config.json that does not match them
    check_against_model_config(t, model_config)
    if t.use_peft:
        check_peft_supported(run, model_config.model_type)
        check_peft_inputs(run, model_config)  # the adapter folder to continue from, LoRA's target modules
    tokenizer = load_tokenizer(t.tokenizer_name or t.model_name,
                               "--tokenizer_name" if t.tokenizer_name else "--model_name")
    return model_config, tokenizer


def start_processes(run: RunConfigs) -> Tuple[DistInfo, str]:
    """The process group (under torchrun with --enable_fsdp), the device, the seeds and the precision mode."""
    t = run.train
    allocator_note = configure_cuda_allocator()  # before CUDA starts
    dist_info = distributed.setup(t.enable_fsdp, t.dist_timeout_s)
    seed_everything(t.seed)
    precision = P.resolve(run, dist_info.device)  # one mode; configs/precision.py says what it implies
    if t.quantization:
        quantization.check_quantization(run, precision, sharded=t.enable_fsdp and dist_info.distributed)
    if t.enable_fsdp:
        check_fsdp_config(run, dist_info)  # mesh sizes, CPU offload
    if run.demo_preset:
        log("--> no --model_name: embedded demo with the bundled tiny Llama and Alpaca sample; preset "
            + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in DEMO_PRESET.items()) + " (flags override)")
    log(f"--> device {dist_info.device} x {dist_info.world_size} process(es), precision {precision}"
        + (f"; {allocator_note}" if dist_info.device.type == "cuda" else ""))
    return dist_info, precision


@dataclass
class RunOutput:
    """Where the run writes and what it continues from: decided once, on rank 0, and shared by every rank."""

    path: Path
    run_dir: RunDir
    resume: Optional[ResumePoint]  # the checkpoint to continue from (None: from scratch)
    run_id: str


def claim_output(run: RunConfigs, dist_info: DistInfo) -> RunOutput:
    """One run per output folder (a lock), never silently on top of an earlier run's results, and the checkpoint to
    resume (--resume_from DIR | auto). Writes nothing: a new folder is created once every input is checked."""
    run_dir = distributed.on_rank0(lambda: claim_output_dir(run), "claim the output folder")
    resume = find_resume_point(run, run_dir.previous_run_id, dist_info.world_size)
    run_id = (resume.info.get("run_id") or run_dir.run_id) if resume else run_dir.run_id
    return RunOutput(Path(run.train.output_dir), run_dir, resume, run_id)


def build_data(run: RunConfigs, tokenizer, dist_info: DistInfo):
    """Tokenised train / eval samples and their loaders; checks that a batch and a step fit the training set."""
    t = run.train
    train_samples = get_preprocessed_dataset(tokenizer, run.dataset, "train", t, rank=dist_info.rank)
    eval_samples = (get_preprocessed_dataset(tokenizer, run.dataset, "val", t, rank=dist_info.rank)
                    if t.run_validation else None)
    collate = get_custom_data_collator(tokenizer, run.dataset)
    train_loader = build_dataloader(train_samples, tokenizer, t, train=True, rank=dist_info.rank,
                                    world_size=dist_info.world_size, collate_fn=collate)
    eval_loader = (build_dataloader(eval_samples, tokenizer, t, train=False, rank=dist_info.rank,
                                    world_size=dist_info.world_size, collate_fn=collate)
                   if eval_samples is not None else None)
    log(f"--> {t.dataset}: {len(train_samples)} train samples -> {len(train_loader)} batches per rank"
        + (f"; {len(eval_samples)} eval samples" if eval_samples is not None else ""))
    check_batch_fits(train_loader, t.batch_size_training, dist_info.world_size)
    if t.gradient_accumulation_steps > len(train_loader):  # every epoch would be one short, silent step
        raise ConfigError(f"--gradient_accumulation_steps {t.gradient_accumulation_steps} is more than the "
                          f"{len(train_loader)} batches an epoch has per rank: no optimizer step would get its "
                          f"micro-batches; use at most {len(train_loader)} (or a smaller --batch_size_training)")
    return train_loader, eval_loader


def record_settings(run: RunConfigs, out: RunOutput, dist_info: DistInfo) -> None:
    """Rank 0 creates (and locks) the output folder and writes the resolved config; every rank logs the changes."""
    if dist_info.is_main:
        lock_new_output_dir(out.run_dir)
        save_resolved(run, out.path / "run_config.yaml")
    log(f"--> settings that differ from the defaults (the full config is in {out.path / 'run_config.yaml'}):\n"
        f"{format_changed_settings(run)}")


def build_lm(run: RunConfigs, resume: Optional[ResumePoint], model_config, tokenizer, dist_info: DistInfo,
             precision: str, packing: bool):
    """The Hugging Face model (load, freeze, PEFT: models/builder.py) and the dtype its export is written in."""
    t = run.train
    bnb_config = run.quantization.create_bnb_config(t.quantization) if t.quantization else None
    # --low_cpu_fsdp: ranks other than 0 build the model on the meta device and receive rank 0's weights. A
    # quantized model cannot travel that way (models/quantization.py): every rank loads its own 4-bit copy.
    meta = t.low_cpu_fsdp and not dist_info.is_main and bnb_config is None
    if t.low_cpu_fsdp and bnb_config is not None:
        log(f"--> --low_cpu_fsdp with --quantization {t.quantization}: every rank loads the quantized model "
            "straight onto its GPU (quantized tensor by tensor; 4-bit state is not a broadcastable state dict)")
    # A FULL_STATE_DICT checkpoint brings its own weights (a Hugging Face folder, or a PEFT adapter folder):
    # run state, kept out of the config so that later checkpoints' run_config.yaml never points into one.
    source = WeightSource.for_run(run, resume)
    export_dtype = getattr(model_config, "dtype", None) or torch.float32
    if isinstance(export_dtype, str):
        export_dtype = getattr(torch, export_dtype)
    lm = build_model(run, source, precision, dist_info.device, tokenizer, meta=meta, packing=packing,
                     dtype=load_dtype(run, precision, dist_info, source, export_dtype), bnb_config=bnb_config)
    log(f"--> model {t.model_name}: {sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M parameters, "
        f"{sum(p.numel() for p in lm.parameters() if p.requires_grad) / 1e6:.2f}M trainable")
    return lm, export_dtype


def build_observers(run: RunConfigs, model, dist_info: DistInfo, output_dir: Path, cleanup: contextlib.ExitStack):
    """Analytic FLOPs and the accelerator peak (MFU), the metrics file and trackers, the profiler or FLOP counter;
    each is closed by ``cleanup`` however the run ends."""
    t = run.train
    model_flops = count_model_flops(model)
    peak_tflops, peak_note = peak_tflops_for(dist_info.device, t.peak_tflops)
    log(f"--> {peak_note}; analytic {model_flops.per_token(t.context_length) / 1e9:.4g} GFLOP per token at "
        f"{t.context_length} tokens (docs/observability.md)")
    observers: List[Any] = [build_profiler(run, dist_info.device)] if t.use_profiler else []
    if t.flop_counter:
        observers.append(FlopCounter(t.flop_counter_start, dist_info.device, model_flops, peak_tflops,
                                     recomputes_layers=checkpointed_fraction(model),
                                     world_size=dist_info.world_size, is_main=dist_info.is_main))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    metrics_path = output_dir / f"metrics_{stamp}.jsonl" if t.save_metrics and dist_info.is_main else None
    metrics = MetricsWriter(metrics_path, build_trackers(run, output_dir, dist_info.is_main, metrics_path))
    for closeable in (metrics, *observers):
        cleanup.callback(closeable.close)
    return observers, metrics, model_flops, peak_tflops


def check_disk(run: RunConfigs, model, checkpointer: Checkpointer, export_dtype: torch.dtype,
               dist_info: DistInfo) -> None:
    """Rank 0 warns before training when the disk cannot hold the checkpoints and the exported model."""
    if not dist_info.is_main:
        return
    t = run.train
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    warn_if_low_disk(checkpointer.root, checkpoint_bytes=3 * trainable,  # weights + two AdamW moments
                     copies=t.keep_last_n_checkpoints + 1,
                     export_bytes=total * export_dtype.itemsize if t.save_model else 0)


def already_finished(run: RunConfigs, state, resume: ResumePoint) -> bool:
    t = run.train
    if (t.max_train_step and state.step >= t.max_train_step) or state.epoch >= t.num_epochs:
        log(f"--> the run resumed from {resume.path} had already finished (step {state.step}, "
            f"{state.epoch} of {t.num_epochs} epochs, --max_train_step {t.max_train_step}): nothing to train")
        return True
    return False


def write_summary(summary: dict, output_dir: Path, dist_info: DistInfo) -> None:
    if dist_info.is_main:
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        log("--> summary: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in summary.items() if k != "phases_s"))  # a line of its own
