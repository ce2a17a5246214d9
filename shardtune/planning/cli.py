"""``shardtune plan [--gpus N] [--gpu_memory_gb G] [--nodes H] [--plan_json] [finetuning flags]``.

The finetuning flags are read exactly as a run reads them (fire, then configs/parse.py); the plan's own four are
taken out first. Prints one screen (or, with --plan_json, one JSON object of bytes on stdout); bad input of either
kind is one ``error:`` line and exit status 2, as for a run. No GPU, no weights: docs/planning.md.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, Optional

from shardtune.configs.parse import coerce
from shardtune.errors import EXIT_OK, EXIT_USAGE, ConfigError
from shardtune.observability.memory import GB
from shardtune.planning.estimate import Cluster, RunPlan, parse_run, plan_run
from shardtune.planning.suggest import smallest_change

USAGE = """usage: shardtune plan [--gpus N] [--gpu_memory_gb G] [--nodes H] [--plan_json] [finetuning flags]

  --gpus N           GPUs in all, the run's world size (default 1)
  --gpu_memory_gb G  memory of one GPU in GB of 2^30 bytes (default 80; an "80 GB" H100 has 79.6)
  --nodes H          hosts the GPUs are spread over, N/H per host (default 1)
  --plan_json        print the plan as one JSON object (bytes) instead of the screen
  finetuning flags   the run's, e.g. --enable_fsdp --low_cpu_fsdp --fsdp_config.pure_bf16 --model_name DIR

Needs no GPU and reads no weights: the model is built from its config.json on the meta device (a hub id needs
the network; a local folder works offline). docs/planning.md explains every figure."""

PLAN_FLAGS = {"gpus": (int, 1), "gpu_memory_gb": (float, 80.0), "nodes": (int, 1), "plan_json": (bool, False)}


def split_flags(argv) -> tuple:
    """(the plan's own settings, the finetuning flags as fire parses them for a run)."""
    import fire

    kwargs: Dict[str, Any] = {}

    def capture(*positional, **given) -> None:  # returns nothing: fire would print a returned value
        if positional:
            raise ConfigError(f"unexpected argument {positional[0]!r}: options are given as --name value (is a "
                              "--flag missing before it?); see shardtune plan --help")
        kwargs.update(given)

    fire.Fire(capture, command=list(argv), name="shardtune plan")
    own = {}
    for name, (tp, default) in PLAN_FLAGS.items():
        value = kwargs.pop(name, default)
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"--{name} needs a value (it was given without one); e.g. --{name} 8")
        own[name] = coerce(value, tp, f"--{name}")
    return own, kwargs


def plan_cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.partition("=")[0] in ("-h", "--help", "-help") for a in argv):
        print(USAGE)
        return EXIT_OK
    try:
        own, kwargs = split_flags(argv)
        cluster = Cluster(own["gpus"], int(own["gpu_memory_gb"] * GB), own["nodes"]).check()
        plan = plan_run(kwargs, cluster)  # the run's log lines once, on stderr; suggest.py's variants are quiet
        change, changed = (None, None) if plan.fits else smallest_change(kwargs, plan, parse_run(kwargs, cluster))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if own["plan_json"]:
        out = plan.to_dict()
        out["suggestion"] = None if change is None else {"change": change, "needed": changed.gpu.needed}
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(plan, change, changed))
    return EXIT_OK


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / GB:.1f} GB"


def _signed_gb(n: int) -> str:
    return f"{n / GB:+.1f} GB"


def format_plan(plan: RunPlan, change: Optional[str] = None, changed: Optional[RunPlan] = None) -> str:
    """The plan on one screen."""
    c, g = plan.cluster, plan.gpu
    lines = [f"plan: {plan.model} on {c.gpus} GPU(s) of {c.gpu_memory / GB:g} GB over {c.nodes} host(s) "
             "(GB = 2^30 bytes)",
             f"  model: {_count(plan.parameters)} parameters, {_count(plan.trainable)} trainable; precision "
             f"{plan.precision}; {plan.mesh}",
             f"  activation checkpointing {plan.checkpointing}"]
    if plan.gathered_note:
        lines.append(f"  {plan.gathered_note}")
    if g is None:
        lines.append("  per GPU: no estimate for this architecture (its config has no hidden_size / "
                     "intermediate_size); the run checkpoints every layer")
    else:
        lines += ["per GPU:",
                  f"  parameters {_gb(g.parameters)}"
                  + (f" + quantization state {_gb(g.quantization_state)}" if g.quantization_state else "")
                  + f", gradients {_gb(g.gradients)}, optimizer state {_gb(g.optimizer)}",
                  f"  gathered parameters + loss workspace {_gb(g.gathered_and_loss)} (largest gathered unit "
                  f"{_gb(g.largest_gathered_unit)})",
                  f"  activations {_gb(g.activations)} with {plan.checkpointed} of {plan.layers} layers checkpointed; "
                  f"peak with none {_gb(g.peak_no_checkpointing)}, with every layer {_gb(g.peak_every_layer)}",
                  f"  estimated peak {_gb(g.peak)}" + (f" (plan budget {_gb(g.budget)})" if g.budget else "")
                  + (f" + quantization state {_gb(g.quantization_state)}" if g.quantization_state else "")
                  + f"; peak reserved {_gb(g.peak_reserved)} (CUDA allocator margin {_signed_gb(g.allocator_margin)}, "
                  f"measured) + CUDA context {_gb(g.cuda_context)} = {_gb(g.needed)} of {_gb(c.gpu_memory)}"]
    lines.append("per host while loading (peak resident memory; after that the weights live on the GPUs):")
    for name, host, used in (("--low_cpu_fsdp", plan.host_low_cpu, plan.low_cpu_fsdp),
                             ("without --low_cpu_fsdp", plan.host_without, not plan.low_cpu_fsdp)):
        lines.append(f"  {name:<23}rank 0 {_gb(host.rank0)}, each other rank {_gb(host.other_ranks)}; "
                     f"first host {_gb(host.first_host)}" + (f", other hosts {_gb(host.other_hosts)}" if c.nodes > 1
                                                              else "") + ("   <- this run" if used else ""))
    if plan.host_checkpoint_staging:
        lines += [f"per rank while training: {_gb(plan.host_checkpoint_staging)} of host memory, the staging copy of "
                  "background checkpoints", "  (--fsdp_config.async_checkpoint False: none; training waits for each save)"]
    if plan.fits:
        lines.append(f"fits: yes ({_gb(c.gpu_memory - g.needed)} to spare per GPU)")
    elif g is None:
        lines.append("fits: unknown (no estimate)")
    elif change is None:
        lines.append("fits: NO, and no change tried fits (batch, checkpointing, CPU offload, up to "
                     "16x the GPUs, LoRA)")
    else:
        host = changed.host_low_cpu if changed.low_cpu_fsdp else changed.host_without
        lines.append(f"fits: NO ({_gb(g.needed)} needed); smallest change that fits: {change} "
                     f"({_gb(changed.gpu.needed)} per GPU, first host {_gb(host.first_host)})")
    return "\n".join(lines)
