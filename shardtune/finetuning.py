"""``main``: one straight path through named modules, one numbered block each.

1. config (configs/, configs/parse.py)    2. processes, device, precision (utils/distributed.py,
configs/precision.py)    3. data (datasets/, data/)    4. model (models/builder.py)    5. wrap
(policies/fsdp.py)    6. optimizer    7. loop (training/loop.py), which writes checkpoints and the
exported model (model_checkpointing/). Observability (observability/) watches from the side.

All checks that can fail on user input run before the model's weights are loaded (data comes before the
model for that reason: a bad data file is found in seconds, not after loading 70B weights).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from shardtune.configs import precision as P
from shardtune.configs.parse import parse_cli, resolve_compile, save_resolved
from shardtune.configs.run import RunConfigs
from shardtune.errors import EXIT_PREEMPTED, ConfigError, first_line
from shardtune.policies.mixed_precision import autocast, grad_scaler
from shardtune.policies.optimizer import build_lr_scheduler, build_optimizer
from shardtune.training.preemption import Preempted
from shardtune.utils import distributed
from shardtune.utils.io import atomic_write_text, remove_new_files_on_error
from shardtune.utils.logging import log, warn
from shardtune.utils.rng import seed_everything


def build_data(run: RunConfigs, tokenizer, dist_info):
    """Tokenised train / eval samples and their loaders; checks that a batch fits the training set."""
    from shardtune.data.loader import build_dataloader, check_batch_fits
    from shardtune.datasets import get_custom_data_collator, get_preprocessed_dataset

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
    return train_loader, eval_loader


def main(**kwargs) -> dict:
    # 1. Configs: parse and validate everything before any expensive work.
    run = parse_cli(kwargs)
    t = run.train
    if distributed.env_world_size() > 1 and not t.enable_fsdp:
        raise ConfigError(f"launched with {distributed.env_world_size()} processes but without --enable_fsdp: "
                          "add --enable_fsdp to shard the model (or run one process)")
    if t.quantization:
        from shardtune.models.quantization import check_available

        check_available()  # a CUDA GPU and bitsandbytes: one line, before anything is loaded
    from shardtune.observability.profiler import check_profiler_config
    from shardtune.observability.trackers import check_trackers

    check_trackers(run)  # --use_wandb / --use_tensorboard without the 'tracking' extra: one line, now
    check_profiler_config(run)

    from shardtune.models.loading import (ModelSource, check_against_model_config, check_weight_files,
                                          load_model_config, load_tokenizer)

    model_source = ModelSource.parse(t.model_name)
    model_config = load_model_config(model_source)  # cheap: config.json only
    check_weight_files(model_source)  # truncated or corrupt safetensors: headers only
    check_against_model_config(t, model_config)
    if t.use_peft:
        from shardtune.models.peft import check_peft_supported

        check_peft_supported(run, model_config.model_type)
    tokenizer = load_tokenizer(t.tokenizer_name or t.model_name,
                               "--tokenizer_name" if t.tokenizer_name else "--model_name")

    # 2. Processes, device, seeds, precision. (The CUDA allocator is configured before CUDA starts.)
    from shardtune.utils.distributed import configure_cuda_allocator

    allocator_note = configure_cuda_allocator()
    dist_info = distributed.setup(t.enable_fsdp, t.dist_timeout_s)
    device = dist_info.device
    seed_everything(t.seed)
    precision = P.resolve(run, device)  # one mode; configs/precision.py says what it implies
    if t.quantization:
        from shardtune.models.quantization import check_quantization

        check_quantization(run, precision, sharded=t.enable_fsdp and dist_info.distributed)
    output_dir = Path(t.output_dir)
    from shardtune.model_checkpointing.output_dir import claim_output_dir, lock_new_output_dir, release_locks, start_run

    # One run per output folder (a lock), and never silently on top of an earlier run's results. Nothing is
    # written here: a folder that does not exist yet is created (and locked) once every input is checked.
    run_dir = distributed.on_rank0(lambda: claim_output_dir(run), "claim the output folder")
    if run.demo_preset:
        from shardtune.configs.presets import DEMO_PRESET

        log("--> no --model_name: embedded demo with the bundled tiny Llama and Alpaca sample; preset "
            + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in DEMO_PRESET.items()) + " (flags override)")
    log(f"--> device {device} x {dist_info.world_size} process(es), precision {precision}"
        + (f"; {allocator_note}" if device.type == "cuda" else ""))
    if t.enable_fsdp:
        from shardtune.policies.fsdp import check_fsdp_config

        check_fsdp_config(run, dist_info)  # mesh sizes, CPU offload: one-line errors before anything is loaded
    from shardtune.model_checkpointing.checkpoint import find_resume_point

    # --resume_from DIR | auto -> the checkpoint to continue from (None: from scratch)
    resume = find_resume_point(run, run_dir.previous_run_id, dist_info.world_size)
    run_id = (resume.info.get("run_id") or run_dir.run_id) if resume else run_dir.run_id

    # 3. Data (file errors surface here, before the weights are read). A data error removes the tokenised
    #    cache it may have written, so that rejected input leaves the output folder as it was.
    with remove_new_files_on_error(output_dir, ConfigError) if distributed.is_main() else contextlib.nullcontext():
        train_loader, eval_loader = build_data(run, tokenizer, dist_info)
    # Every input is checked: the first file of the run goes into the output folder now.
    if distributed.is_main():
        lock_new_output_dir(run_dir)
        save_resolved(run, output_dir / "run_config.yaml")
    from shardtune.configs.help import format_changed_settings

    log(f"--> settings that differ from the defaults (the full config is in {output_dir / 'run_config.yaml'}):\n"
        f"{format_changed_settings(run)}")

    # 4. Model: build (load, freeze, PEFT: models/builder.py) and wrap it for the loss (models/loss.py).
    from shardtune.models.builder import WeightSource, build_model
    from shardtune.models.loss import CausalLMWithLoss

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
    from shardtune.data.loader import is_packed
    from shardtune.models.builder import load_dtype

    lm = build_model(run, source, precision, device, tokenizer, meta=meta, packing=is_packed(train_loader),
                     dtype=load_dtype(run, precision, dist_info, source, export_dtype), bnb_config=bnb_config)
    model = CausalLMWithLoss(lm)
    if resolve_compile(run, device):
        from shardtune.policies.compile import compile_decoder_layers

        compile_decoder_layers(model)
    total = sum(p.numel() for p in model.parameters())
    log(f"--> model {t.model_name}: {total / 1e6:.2f}M parameters, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable")

    # 5. Wrap: shard with FSDP2 under torchrun, else move to the device; activation checkpointing either way.
    from shardtune.policies.fsdp import wrap_model

    model, sync_fn = wrap_model(model, run, dist_info, precision, on_device=bnb_config is not None)

    # 6. Optimizer, schedule, precision helpers.
    optimizer = build_optimizer(model, run, device)
    lr_scheduler = build_lr_scheduler(optimizer, run)
    scaler = grad_scaler(precision, device)

    # 7. Train; checkpoints and the exported model are written from inside the loop (model_checkpointing/).
    from shardtune.model_checkpointing.checkpoint import Checkpointer
    from shardtune.observability.metrics import MetricsWriter
    from shardtune.training.context import StepNumerics, Telemetry, TrainContext
    from shardtune.training.loop import train
    from shardtune.training.preemption import StopRequest
    from shardtune.utils.disk import guard_saves, warn_if_low_disk

    stamp = time.strftime("%Y%m%d-%H%M%S")
    metrics_path = output_dir / f"metrics_{stamp}.jsonl" if t.save_metrics and distributed.is_main() else None
    # Observability: analytic FLOPs and the accelerator peak (MFU), trackers, profiler or FLOP counter.
    from shardtune.observability.flops import FlopCounter, count_model_flops
    from shardtune.observability.mfu import peak_tflops_for
    from shardtune.observability.profiler import build_profiler
    from shardtune.observability.trackers import build_trackers

    model_flops = count_model_flops(model)
    peak_tflops, peak_note = peak_tflops_for(device, t.peak_tflops)
    log(f"--> {peak_note}; analytic {model_flops.per_token(t.context_length) / 1e9:.4g} GFLOP per token at "
        f"{t.context_length} tokens (docs/observability.md)")
    observers = [build_profiler(run, device)] if t.use_profiler else []
    if t.flop_counter:
        from shardtune.policies.activation_checkpointing import checkpointed_fraction

        observers.append(FlopCounter(t.flop_counter_start, device, model_flops, peak_tflops,
                                     recomputes_layers=checkpointed_fraction(model),
                                     world_size=dist_info.world_size, is_main=dist_info.is_main))
    metrics = MetricsWriter(metrics_path, build_trackers(run, output_dir, distributed.is_main()))

    # Resumable checkpoints (every --save_every_n_steps and per epoch) and the exported model / adapter
    # (<output_dir>/model); resuming restores model, optimizer, scheduler, progress and RNG.
    checkpointer = Checkpointer(run, model, lm, optimizer, lr_scheduler, scaler, tokenizer, export_dtype, run_id,
                                dist_info)
    distributed.on_rank0(lambda: start_run(run, run_dir, run_id), "record the run")
    # A full disk or a file-size limit during a save: one line, no temporary folders left (utils/disk.py).
    save_checkpoint = guard_saves(checkpointer, [checkpointer.root, output_dir])
    if distributed.is_main():
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        warn_if_low_disk(checkpointer.root, checkpoint_bytes=3 * trainable,  # weights + two AdamW moments
                         copies=t.keep_last_n_checkpoints + 1, export_bytes=total * export_dtype.itemsize
                         if t.save_model else 0)
    state, restore_rng = checkpointer.load(resume) if resume else (None, None)
    if resume:
        checkpointer.finish_interrupted_export(resume)  # a run killed while exporting its model
        if (t.max_train_step and state.step >= t.max_train_step) or state.epoch >= t.num_epochs:
            log(f"--> the run resumed from {resume.path} had already finished (step {state.step}, "
                f"{state.epoch} of {t.num_epochs} epochs, --max_train_step {t.max_train_step}): nothing to train")
            for obs in observers:
                obs.close()
            metrics.close()
            distributed.cleanup()
            release_locks()
            return {"steps": state.step, "already_finished": True}

    numerics = StepNumerics(autocast=autocast(precision, device, t.enable_fsdp and dist_info.distributed),
                            scaler=scaler, set_gradient_sync=sync_fn)
    telemetry = Telemetry(metrics=metrics, observers=observers, model_flops=model_flops, peak_tflops=peak_tflops)
    ctx = TrainContext(run=run, device=device, numerics=numerics, telemetry=telemetry, save_checkpoint=save_checkpoint,
                       restore_rng=restore_rng, stop_request=StopRequest())
    try:
        with ctx.stop_request:  # SIGTERM / SIGINT from here on: finish the step, checkpoint, exit 75
            summary = train(model, train_loader, eval_loader, optimizer, lr_scheduler, ctx, state=state)
        summary.update({"flop_counter": obs.result for obs in observers if getattr(obs, "result", None)})
    finally:
        for obs in observers:
            obs.close()
        metrics.close()
    if metrics_path is not None:
        summary["metrics_file"] = str(metrics_path)
    if distributed.is_main():
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        log("--> summary: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in summary.items()))
    distributed.cleanup()
    release_locks()
    return summary


RANK0_FIRST_S = 2.0  # how long other ranks wait before exiting on a config error (rank 0 prints it)


def _run_without_result(*positional, **kwargs) -> None:
    if positional:  # fire would train first and only then complain about the leftover argument
        raise ConfigError(f"unexpected argument {positional[0]!r}: options are given as --name value (is a --flag "
                          "missing before it?); see --help")
    main(**kwargs)  # fire would print a returned dict


def _flag_names(argv) -> list:
    return [token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")]


def _wants_debug(argv) -> bool:
    """--debug, --debug True, --debug=1 (read before parsing, so that parse errors show a traceback too)."""
    for i, token in enumerate(argv):
        name, eq, value = token[2:].partition("=")
        if token.startswith("--") and name.replace("-", "_") in ("debug", "train_config.debug"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
            return value.strip().lower() in ("true", "1", "yes", "y", "on")
    return False


def _say(line: str) -> None:
    """The run's last line, on stderr and on a line of its own even when a progress bar is open."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def _help_topic(argv) -> Optional[str]:
    """``--help fsdp_config`` / ``--help=fsdp_config``: the config to show alone (None: everything)."""
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        if name in ("-h", "--help", "-help"):
            if eq:
                return value
            return argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
    return None


def _print_help(topic: Optional[str]) -> int:
    from shardtune.configs.help import format_help

    try:
        text = format_help(topic)
    except ConfigError as exc:
        _say(f"error: {exc}")
        return 2
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `--help | head`: the reader left; send the rest (and the exit flush) nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cli(argv=None) -> int:
    """Console entry: ``--help [CONFIG]`` prints the usage and every config's fields (or one config's). A ConfigError prints one line (rank 0) and exits
    2; any other error prints one line per rank and exits 1. ``--debug`` prints the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a.partition("=")[0] in ("-h", "--help", "-help") for a in argv):
        return _print_help(_help_topic(argv))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = _flag_names(argv)
    for name in sorted({n for n in names if names.count(n) > 1}):
        warn(f"--{name} is given {names.count(name)} times; the last value is used")
    import fire

    from shardtune.errors import SaveError, TrainingDiverged

    try:
        fire.Fire(_run_without_result, command=argv, name="finetuning.py")
    except Preempted as stop:  # every rank agreed to stop after the same step and the checkpoint is written
        if distributed.is_main():
            _say(str(stop))
        distributed.cleanup()
        return EXIT_PREEMPTED
    except ConfigError as exc:
        if _wants_debug(argv):
            traceback.print_exc()
        elif distributed.is_main():  # every rank meets the same bad input: say it once
            _say(f"error: {exc}")
        else:  # torchrun stops the other ranks as soon as one exits: let rank 0 print first
            time.sleep(RANK0_FIRST_S)
        return 2
    except TrainingDiverged as exc:  # every rank saw the same global loss: say it once; nothing was saved
        if distributed.is_main():
            _say(f"error: {exc}")
        distributed.abort()
        return 1
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - one line per rank (DCP raises BaseExceptions); traceback on request
        if _wants_debug(argv):
            traceback.print_exc()
        else:
            where = f"[rank {distributed.info().rank}] " if distributed.info().world_size > 1 else ""
            first = first_line(exc)
            what = distributed.describe_timeout(exc) or (
                first if isinstance(exc, SaveError) else f"{type(exc).__name__}: {first} (--debug shows the traceback)")
            _say(f"error: {where}{what}")
        return 1
    return 0
