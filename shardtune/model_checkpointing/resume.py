"""Which checkpoint a run resumes from: ``--resume_from DIR | auto`` -> a verified :class:`ResumePoint`, or None.

The choice is made once, by rank 0, and broadcast (every rank helps read the files back; rank 0 alone judges
them): so all ranks take the same decision even on a file system whose caches differ between nodes.

* ``auto``: the step_* folders of the checkpoint root, newest first. Each one is verified against its manifest
  (integrity.py); one that fails is skipped with one warning line naming the file that failed (changed,
  emptied, missing, or a file it was not saved with), and the next older one is tried. The first that passes
  and belongs to this run (its run id) is resumed. A checkpoint without any manifest is skipped too: it
  cannot be verified. If checkpoints exist but none passes: refused (ConfigError, one line), never a silent
  fresh start on top of them.
* ``DIR`` (a step_* folder, or a root: its newest): that one, or a refusal naming the file that failed.
  ``--resume_unverified`` lets it resume a checkpoint that has no manifest at all.
* A checkpoint of format 1 (``checksums.json`` over weights, optimizer and RNG only) resumes after those
  checksums pass, with one warning that its state.json and run_config.yaml are not covered. Refusing it, or
  requiring --resume_unverified, would strand every run saved before the upgrade although its large files are
  verified; its small state files are at least parsed and checked for compatibility below.

Another world size (or batch size) than the checkpoint's: resumed, not refused. DCP reshards the weights and the
optimizer state on load, a full checkpoint is broadcast and sharded again (weights.py), and the data continues
from the global position (samples consumed in the epoch by all ranks, data/sampler.py). The global batch
(ranks x batch x accumulation) is kept by adjusting --gradient_accumulation_steps unless the flag is given;
:func:`plan_layout` decides that once, on rank 0, and one line says what changes and what does not. Refused
(one line, before anything is loaded): a checkpoint taken mid-epoch whose sample order this run would change
(data set, seed, context length, batching), one of format 1-2 taken mid-epoch on another layout (its position
is in per-rank batches), and a given --gradient_accumulation_steps that changes the global batch on another
world size or batch size (leaving the flag out keeps it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from shardtune.configs.fsdp import StateDictType
from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError
from shardtune.model_checkpointing import integrity
from shardtune.model_checkpointing.integrity import Coverage
from shardtune.model_checkpointing.layout import (ORDER_KEYS, READABLE_FORMATS, STATE_FILE, checkpoint_root,
                                                  data_layout, list_checkpoint_dirs, step_dir_name, step_of,
                                                  try_read_state)
from shardtune.model_checkpointing.weights import MODEL_DIR
from shardtune.utils import distributed
from shardtune.utils.logging import log, warn


@dataclass(frozen=True)
class LayoutPlan:
    """How this run continues the checkpoint's: its gradient accumulation, and the line that says what changed."""

    gradient_accumulation_steps: int
    line: str


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to resume from, and where its model weights come from."""

    path: Path
    checkpoint_type: StateDictType
    info: dict
    plan: Optional[LayoutPlan] = None  # None: the checkpoint records no layout (format 1 without one)

    @property
    def model_dir(self) -> Optional[Path]:
        """FULL_STATE_DICT, full fine-tuning: the checkpoint's HF folder replaces --model_name."""
        if self.checkpoint_type is StateDictType.FULL_STATE_DICT and not self.info.get("use_peft"):
            return self.path / MODEL_DIR
        return None

    @property
    def adapter_dir(self) -> Optional[Path]:
        """FULL_STATE_DICT, PEFT: the checkpoint's adapter folder replaces --from_peft_checkpoint."""
        if self.checkpoint_type is StateDictType.FULL_STATE_DICT and self.info.get("use_peft"):
            return self.path / MODEL_DIR
        return None

    @property
    def step(self) -> int:
        return int(self.info["train_state"]["step"])


class _Skip:
    """Rank 0's verdict on one candidate under auto: not this one (why: a damaged one; None: another run's)."""

    def __init__(self, why: Optional[str]):
        self.why = why


def _candidates(run: RunConfigs) -> List[str]:
    """Rank 0: the checkpoints --resume_from may use, newest first (explicit: exactly one)."""
    value = run.train.resume_from.strip()
    if value == "auto":
        return [str(p) for p in reversed(list_checkpoint_dirs(checkpoint_root(run)))]
    path = Path(value)
    newest = list_checkpoint_dirs(path) if path.is_dir() and step_of(path) is None else []
    if newest and not (path / STATE_FILE).exists() and not (path / integrity.MANIFEST).exists():
        path = newest[-1]  # a checkpoint root was given: take its newest
    if not path.is_dir():
        raise ConfigError(f"--resume_from: {value} is not a complete checkpoint (a folder with {STATE_FILE} and "
                          f"{integrity.MANIFEST}, e.g. {checkpoint_root(run) / step_dir_name(100)}), or use "
                          f"--resume_from auto")
    return [str(path)]


def _check_readable(run: RunConfigs, path: Path, info: dict) -> None:
    """One-line errors for a checkpoint this version or this run cannot read."""
    if info.get("format") not in READABLE_FORMATS:
        raise ConfigError(f"--resume_from: {path} has checkpoint format {info.get('format')!r}; this version "
                          f"reads formats {', '.join(map(str, READABLE_FORMATS))}")
    if bool(info.get("use_peft")) != bool(run.train.use_peft):
        raise ConfigError(f"--resume_from: {path} was saved {'with' if info.get('use_peft') else 'without'} "
                          f"--use_peft; resume with the same setting")


def _check_position(run: RunConfigs, path: Path, info: dict, world_size: int, plan: Optional[LayoutPlan]) -> None:
    """A checkpoint taken mid-epoch: one-line errors where this run cannot map its data position back to samples
    (``plan``: the accumulation this run will use)."""
    saved, now = info.get("data_layout"), data_layout(run, world_size)
    if plan is not None:
        now["gradient_accumulation_steps"] = plan.gradient_accumulation_steps
    ts = info["train_state"]
    # Format 3 counts the position in samples of the epoch's order, whatever the layout; older ones in per-rank
    # batches, which only the saved layout maps back to samples.
    global_position = "samples_in_epoch" in ts
    where = f"{ts['samples_in_epoch']} samples" if global_position else f"{ts.get('batches_in_epoch', 0)} batches"
    keys = ORDER_KEYS if global_position else tuple(now)
    changed = [k for k in keys if saved is not None and saved.get(k) != now[k]]
    if (ts.get("samples_in_epoch") or ts.get("batches_in_epoch")) and changed:
        diff = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in changed)
        raise ConfigError(f"--resume_from: {path} was taken {where} into an epoch, and this run changes which samples "
                          f"those were ({diff}); resume with the same settings, or from a checkpoint at an epoch "
                          f"boundary")


def _global_batch_refusal(run: RunConfigs, path: Path, saved: dict, world_size: int, kept_by: Optional[int]) -> str:
    t = run.train
    now = world_size * t.batch_size_training * t.gradient_accumulation_steps
    target = saved["world_size"] * saved["batch_size_training"] * saved["gradient_accumulation_steps"]
    fix = (f"leave the flag out to keep {target} (accumulation {kept_by})" if kept_by else
           f"{target} is not a multiple of {world_size} rank(s) x batch {t.batch_size_training}: leave the flag out "
           f"to take the nearest, or give a --batch_size_training that divides it")
    return (f"--gradient_accumulation_steps {t.gradient_accumulation_steps}: on {world_size} rank(s) x batch "
            f"{t.batch_size_training} the global batch would be {now}, and {path} was trained with {target} "
            f"({saved['world_size']} x {saved['batch_size_training']} x {saved['gradient_accumulation_steps']}); {fix}")


def plan_layout(run: RunConfigs, path: Path, info: dict, world_size: int) -> Optional[LayoutPlan]:
    """Rank 0: the gradient accumulation that keeps the checkpoint's global batch (ranks x batch x accumulation) on
    ``world_size`` ranks, and the line saying what changes; ConfigError where it cannot be honoured."""
    t = run.train
    saved = info.get("data_layout") or {}
    if any(not isinstance(saved.get(k), int) for k in ("world_size", "batch_size_training",
                                                        "gradient_accumulation_steps")):
        return None  # a layout this version did not write: nothing to keep
    w0, b0, ga0 = saved["world_size"], saved["batch_size_training"], saved["gradient_accumulation_steps"]
    target, per_micro_step = w0 * b0 * ga0, world_size * t.batch_size_training
    kept_by = target // per_micro_step if target % per_micro_step == 0 else None
    ga, given = t.gradient_accumulation_steps, ("train_config", "gradient_accumulation_steps") in run.given
    same_layout = (world_size, t.batch_size_training) == (w0, b0)
    if given:
        if not same_layout and per_micro_step * ga != target:
            raise ConfigError(_global_batch_refusal(run, path, saved, world_size, kept_by))
    else:
        ga = kept_by or max(1, round(target / per_micro_step))
    now = per_micro_step * ga
    layout = f"{w0} x {b0} x {ga0} -> {world_size} x {t.batch_size_training} x {ga} (ranks x batch x accumulation)"
    if same_layout and ga == ga0:
        return LayoutPlan(ga, f"--> resume on the saved layout, {layout.split(' -> ')[0]}: continues exactly (the "
                              f"same batches, every rank's RNG streams restored)")
    why = ("--gradient_accumulation_steps given" if given else
           f"{target} is not a multiple of {per_micro_step} ranks x batch: the nearest that is")
    batch = f"global batch {target} kept" if now == target else f"global batch {target} -> {now} ({why})"
    if world_size == w0:
        rng = "every rank's RNG streams restored"
    else:
        low, high = sorted((w0, world_size))
        ranks = f"rank {low}" if high - low == 1 else f"ranks {low}-{high - 1}"
        rng = (f"RNG streams of {ranks} {'start anew (seeded)' if world_size > w0 else 'dropped'}, so random draws "
               f"(dropout) differ from the run that stopped")
    position = info["train_state"].get("samples_in_epoch", 0)
    return LayoutPlan(ga, f"--> resume on another layout, {layout}: {batch}; {rng}; unchanged: the data, which "
                          f"continues after the {position} samples of epoch {info['train_state']['epoch'] + 1} "
                          f"already trained (the same samples, other batch composition), model and optimizer state "
                          f"(resharded), LR schedule")


def _judge(run: RunConfigs, path: Path, verdict: integrity.Verdict, run_id: Optional[str], world_size: int):
    """Rank 0: a ResumePoint for ``path``, a _Skip (auto only), or a ConfigError (one line)."""
    t = run.train
    explicit = t.resume_from.strip() != "auto"
    info, why = try_read_state(path)
    if verdict.problems or (info is None and verdict.coverage is not Coverage.NONE):
        why = integrity.summary(verdict) if verdict.problems else why
        if explicit:
            raise ConfigError(f"--resume_from: {path} fails verification: {why}; resume another checkpoint "
                              f"(--resume_from auto takes the newest intact one)")
        warn(f"skipping damaged checkpoint {path}: {why}")
        return _Skip(why)
    if verdict.coverage is Coverage.NONE:
        unverified = f"{path / integrity.MANIFEST}: missing, so nothing in {path} can be verified"
        if not explicit:
            warn(f"skipping unverifiable checkpoint {path}: {unverified} (to resume it anyway: --resume_from {path} "
                 f"--resume_unverified)")
            return _Skip(unverified)
        if not t.resume_unverified:
            raise ConfigError(f"--resume_from: {unverified}; resume it anyway with --resume_unverified, or resume "
                              f"a checkpoint that has one")
        if info is None:
            raise ConfigError(f"--resume_from: {path} is not a complete checkpoint ({why})")
        warn(f"resuming {path} unverified (--resume_unverified): it has no {integrity.MANIFEST}")
    if not explicit and info.get("run_id") not in (None, run_id):
        return _Skip(None)
    if verdict.coverage is Coverage.LEGACY:
        warn(f"{path} was written by an older version (format 1): its {integrity.LEGACY_MANIFEST} verified the "
             f"weight, optimizer and RNG files; its {' and '.join(integrity.LEGACY_UNCOVERED)} are not covered")
    _check_readable(run, path, info)
    plan = plan_layout(run, path, info, world_size)
    _check_position(run, path, info, world_size, plan)
    return ResumePoint(path, StateDictType[info["checkpoint_type"]], info, plan)


def _log_others(run: RunConfigs, others: int) -> None:
    if others:
        log(f"--> --resume_from auto: ignoring {others} checkpoint(s) in {checkpoint_root(run)} of other runs")


def find_resume_point(run: RunConfigs, run_id: Optional[str] = None, world_size: int = 1) -> Optional[ResumePoint]:
    """--resume_from DIR | auto -> the checkpoint to resume from (None: start fresh). Collective."""
    t = run.train
    value = t.resume_from.strip()
    if t.resume_unverified and value in ("", "auto"):
        raise ConfigError("--resume_unverified is only meaningful with --resume_from DIR (one checkpoint folder, "
                          f"named explicitly){'; not with auto' if value else ''}")
    if not value:
        return None
    candidates = distributed.on_rank0(lambda: _candidates(run), "find a checkpoint")
    skipped: List[str] = []
    others = 0
    for candidate in map(Path, candidates):
        verdict = integrity.verify(candidate)  # read back by every rank, judged by rank 0
        choice = distributed.on_rank0(lambda: _judge(run, candidate, verdict, run_id, world_size),
                                      "choose the checkpoint to resume")
        if isinstance(choice, ResumePoint):
            _log_others(run, others)
            log(f"--> resuming from {candidate} (step {choice.step}, {choice.checkpoint_type.name})")
            if choice.plan is not None:  # decided on rank 0; every rank applies it before the data is built
                t.gradient_accumulation_steps = choice.plan.gradient_accumulation_steps
                log(choice.plan.line)
            return choice
        if choice.why is None:
            others += 1
        else:
            skipped.append(choice.why)
    root = checkpoint_root(run)
    _log_others(run, others)
    if skipped:
        raise ConfigError(f"--resume_from auto: none of the {len(skipped)} checkpoint(s) in {root} passes "
                          f"verification (newest: {skipped[0]}); name one with --resume_from DIR, or start afresh "
                          f"with --overwrite_output_dir")
    log(f"--> --resume_from auto: no complete checkpoint in {root}; starting from scratch")
    return None
