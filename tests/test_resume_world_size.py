"""Resuming on another number of ranks (1 <-> 2 <-> 4 over gloo): the model and
optimizer state are resharded, not re-initialised; the data continues from the global position, so that within the
epoch every sample is trained exactly once (counted by sample id, packing on and off, with and without gradient
accumulation); the global batch is kept by adjusting gradient accumulation; a change that cannot be honoured is
refused with one line before anything is loaded or written.

Two hooks are installed in the test process before the ranks are forked (so they run inside the real runs):
one records the sample ids of every micro-batch the training step moves to the device, the other the optimizer
state right after a checkpoint is loaded."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_fsdp_support import base_kwargs, first_trained_step, log_line, run_ranks, step_losses

from shardtune.model_checkpointing.checkpoint import Checkpointer
from shardtune.models.loss import IGNORE_INDEX, count_supervised_tokens
from shardtune.observability.metrics import read_metrics
from shardtune.training import step

ID_BASE = 10  # sample i is the token ID_BASE + i repeated: every supervised token names its sample
IDS_DATASET = """
def get_custom_dataset(dataset_config, tokenizer, split):
    samples = []
    for i in range({n}):
        ids = [{base} + i] * (3 + (i * 7) % 9)
        samples.append({{"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)}})
    return samples
"""


def _ckpt_root(out: Path) -> Path:
    return Path(out) / "checkpoints" / "fine-tuned"


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


@pytest.fixture()
def record_trained_ids(monkeypatch):
    """Every micro-batch of the real runs: the sample ids of each row that has a supervised token, and its
    supervised token count, appended to $TRAINED_IDS_DIR/rank<r>.jsonl."""
    real = step.to_device

    def recording(batch, device):
        rows = []
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            rows.append(sorted({i - ID_BASE for i, lab in zip(ids, labels) if lab != IGNORE_INDEX}))
        record = {"rows": rows, "tokens": int(count_supervised_tokens(batch["labels"]))}
        with open(Path(os.environ["TRAINED_IDS_DIR"]) / f"rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return real(batch, device)

    monkeypatch.setattr(step, "to_device", recording)


def _trained(folder: Path):
    """(sample ids trained on, in all ranks' micro-batches, as a list with repeats; supervised tokens)."""
    ids, tokens = [], 0
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            ids += [i for row in record["rows"] for i in row]
            tokens += record["tokens"]
    return ids, tokens


def _run(world, kwargs, tmp_path, name, ids=True):
    log_dir = tmp_path / f"ids_{name}"
    log_dir.mkdir()
    results = run_ranks(world, kwargs, tmp_path / f"r_{name}", env={"TRAINED_IDS_DIR": str(log_dir)})
    return results, log_dir


# (batching, ranks and accumulation of the run that stops, ranks of the resume and the accumulation that keeps the
# global batch, steps before the stop)
DATA_CASES = {
    "padding_1_to_2_ranks_accumulation_2_to_1": ("padding", 1, 2, 2, 1, 3),
    "packing_1_to_2_ranks_accumulation_2_to_1": ("packing", 1, 2, 2, 1, 2),
    "packing_2_to_1_ranks_accumulation_1_to_2": ("packing", 2, 1, 1, 2, 2),
    "padding_2_to_1_ranks_accumulation_2_to_4": ("padding", 2, 2, 1, 4, 2),
    "padding_2_to_4_ranks_accumulation_2_to_1": ("padding", 2, 2, 4, 1, 2),
    "padding_4_to_1_ranks_accumulation_1_to_4": ("padding", 4, 1, 1, 4, 2),
    "packing_4_to_2_ranks_accumulation_1_to_2": ("packing", 4, 1, 2, 2, 1),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_another_world_size_trains_every_sample_of_the_epoch_once(case, record_trained_ids, tiny_llama_dir, tmp_path):
    batching, w1, ga1, w2, ga2, stop = DATA_CASES[case]
    n = 40 if batching == "padding" else 64
    dataset = tmp_path / "ids_dataset.py"
    dataset.write_text(IDS_DATASET.format(n=n, base=ID_BASE))
    flags = dict(dataset="custom_dataset", batching_strategy=batching, context_length=32, max_train_step=0,
                 **{"custom_dataset.file": str(dataset)})

    # A: the uninterrupted epoch on the first layout
    _run(w1, base_kwargs(tiny_llama_dir, tmp_path / "A", gradient_accumulation_steps=ga1, **flags), tmp_path, "A")
    # B: stopped after `stop` steps (checkpoint), then resumed on the other world size without the accumulation flag
    first = base_kwargs(tiny_llama_dir, tmp_path / "B", gradient_accumulation_steps=ga1, save_every_n_steps=stop,
                        **{**flags, "max_train_step": stop})
    stopped, before_dir = _run(w1, first, tmp_path, "B1")
    resumed_kwargs = {k: v for k, v in first.items() if k != "gradient_accumulation_steps"}
    resumed, after_dir = _run(w2, {**resumed_kwargs, "max_train_step": 0, "save_every_n_steps": 0,
                                   "resume_from": "auto"}, tmp_path, "B2")

    before, tokens_before = _trained(before_dir)
    after, _ = _trained(after_dir)
    assert sorted(before + after) == list(range(n))  # each sample once: none twice, none skipped
    # The checkpoint records the global position: the samples and supervised tokens trained before it
    (ckpt,) = list(_ckpt_root(tmp_path / "B").glob("step_*"))
    train_state = _state(ckpt)["train_state"]
    unit_count = len(before) if batching == "padding" else None
    assert train_state["tokens_in_epoch"] == tokens_before > 0
    position = stopped[0]["summary"]["data_position"]
    assert position["samples_in_epoch"] == train_state["samples_in_epoch"] > 0 and position["epoch"] == 0
    if unit_count is not None:  # padded batches: a position is a count of samples
        assert train_state["samples_in_epoch"] == unit_count
    assert resumed[0]["summary"]["data_position"]["samples_in_epoch"] == 0  # the epoch was completed
    # The global batch was kept by adjusting the accumulation, and the start says so in one line
    change = log_line(resumed[0]["log"], "global batch")
    assert f"{w1} x 2 x {ga1} -> {w2} x 2 x {ga2}" in change, change
    # Same samples per step, other batch composition: the step losses of the uninterrupted run, up to rounding
    a, b = step_losses(tmp_path / "A"), step_losses(tmp_path / "B")
    assert len(b) == len(a) and b[:stop] == a[:stop]
    assert b == pytest.approx(a, rel=1e-3)
    assert read_metrics(tmp_path / "B", "epoch")[-1]["train_loss"] == pytest.approx(
        read_metrics(tmp_path / "A", "epoch")[-1]["train_loss"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# The model and optimizer state are resharded, not re-initialised
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def record_loaded_optimizer(monkeypatch):
    """Right after a checkpoint is loaded: the optimizer's first moments, gathered, saved to $LOADED_OPTIMIZER."""
    real = Checkpointer.load

    def load(self, point):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        out = real(self, point)
        osd = get_optimizer_state_dict(self.parts.model, self.parts.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=self.info.distributed))
        if self.info.is_main:
            torch.save({k: v["exp_avg"] for k, v in osd["state"].items()}, os.environ["LOADED_OPTIMIZER"])
        return out

    monkeypatch.setattr(Checkpointer, "load", load)


def _saved_first_moments(ckpt: Path, tmp_path: Path) -> dict:
    if (ckpt / "optimizer.json").is_file():  # FULL_STATE_DICT: by parameter name, relative to the training's lm
        from safetensors import safe_open

        saved = json.loads((ckpt / "optimizer.json").read_text())["state"]
        with safe_open(str(ckpt / "optimizer.safetensors"), framework="pt") as fh:
            return {f"lm.{name}": fh.get_tensor(entries["exp_avg"]["tensor"]) for name, entries in saved.items()}
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(ckpt), str(tmp_path / "gathered.pt"))
        state = torch.load(tmp_path / "gathered.pt", weights_only=True)["optim"]["state"]
    return {k: v["exp_avg"] for k, v in state.items()}


STATE_CASES = {
    "sharded_full_fine_tuning": {},
    "sharded_lora": dict(use_peft=True),
    "full_state_dict_lora": dict(use_peft=True, **{"fsdp_config.checkpoint_type": "FULL_STATE_DICT"}),
    "full_state_dict_full_fine_tuning": {"fsdp_config.checkpoint_type": "FULL_STATE_DICT"},
    "sharded_llama_adapter": dict(use_peft=True, peft_method="llama_adapter"),
}


# (case, the layouts in turn as (ranks, gradient accumulation), batch 2 per rank): the first run saves at step 2,
# each resume trains 2 steps more and saves, the last one step. The accumulation is what the resume sets to keep the
# checkpoint's global batch (2 on 4 ranks x batch 2 cannot be kept: the nearest, 8). Every case 1 -> 2 -> 1; sharded
# full fine-tuning 4 -> 2 -> 1, LoRA 1 -> 4, full-state-dict full fine-tuning and the LLaMA-Adapter 4 -> 1 as well.
ONE_TWO_ONE = ((1, 1), (2, 1), (1, 2))
STATE_LAYOUTS = [(case, ONE_TWO_ONE) for case in sorted(STATE_CASES)] + [
    ("sharded_full_fine_tuning", ((4, 1), (2, 2), (1, 4))),
    ("sharded_lora", ((1, 1), (4, 1))),
    ("full_state_dict_full_fine_tuning", ((4, 1), (1, 4))),
    ("sharded_llama_adapter", ((4, 1), (1, 4))),
]


@pytest.mark.parametrize("case,layouts", STATE_LAYOUTS,
                         ids=[f"{c}-{'_'.join(str(w) for w, _ in ls)}" for c, ls in STATE_LAYOUTS])
def test_optimizer_state_is_resharded_on_another_world_size(case, layouts, record_loaded_optimizer, tiny_llama_dir,
                                                             tmp_path):
    """Saved on the first layout at step 2, resumed on each next one in turn (saving at steps 4, 6, ...): after each
    load, the gathered first moments equal the checkpoint's, tensor for tensor."""
    out = tmp_path / "out"
    kwargs = base_kwargs(tiny_llama_dir, out, save_every_n_steps=2, max_train_step=2, **STATE_CASES[case])
    run_ranks(layouts[0][0], kwargs, tmp_path / "r0")
    for k, (world, accumulation) in enumerate(layouts[1:], start=1):
        step_saved = 2 * k
        until = step_saved + (1 if k == len(layouts) - 1 else 2)
        loaded = tmp_path / f"loaded_{k}.pt"
        results = run_ranks(world, {**kwargs, "max_train_step": until, "resume_from": "auto"}, tmp_path / f"r{k}",
                            env={"LOADED_OPTIMIZER": str(loaded)})
        assert first_trained_step(out) == step_saved + 1  # resumed from the newest checkpoint
        (w0, ga0) = layouts[k - 1]
        assert f"{w0} x 2 x {ga0} -> {world} x 2 x {accumulation}" in log_line(results[0]["log"], "global batch")
        saved = _saved_first_moments(_ckpt_root(out) / f"step_{step_saved:06d}", tmp_path)
        restored = torch.load(loaded, weights_only=True)
        assert sorted(restored) == sorted(saved) and saved
        for name, moment in saved.items():
            assert torch.equal(restored[name], moment), name
        assert any(bool(m.abs().sum() > 0) for m in saved.values())  # trained moments, not a fresh optimizer
    assert len(step_losses(out)) == 2 * len(layouts) - 1


# ---------------------------------------------------------------------------------------------
# What cannot be honoured: one line, before anything is loaded, nothing written
# ---------------------------------------------------------------------------------------------
def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_changes_that_cannot_be_honoured_are_refused_before_anything_is_written(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    kwargs = base_kwargs(tiny_llama_dir, out, save_every_n_steps=1, max_train_step=1)
    run_ranks(2, kwargs, tmp_path / "r1")  # 2 ranks x batch 2 x accumulation 1: global batch 4, mid-epoch
    before = _listing(out)
    refusals = {
        # the accumulation given explicitly does not keep the global batch on 1 rank (2 would)
        "accumulation": ({"gradient_accumulation_steps": 1}, ["--gradient_accumulation_steps", "global batch",
                                                              "accumulation 2"]),
        # the epoch's sample order would change under the position
        "seed": ({"seed": 7}, ["seed", "into an epoch"]),
    }
    for name, (change, words) in refusals.items():
        results = run_ranks(1, {**kwargs, "max_train_step": 2, "resume_from": "auto", **change},
                            tmp_path / f"r_{name}", expect_error=True)
        error = results[0].get("error", "")
        assert error.startswith("ConfigError") and "\n" not in error, error
        assert all(w in error for w in words), error
        assert "restored step" not in results[0]["log"]  # refused before anything was loaded
        assert _listing(out) == before  # nothing written


# ---------------------------------------------------------------------------------------------
# The samplers alone: a global position continues any layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["length_grouped", "random"])
def test_sampler_continues_from_a_global_position_on_any_layout(kind):
    from shardtune.data.sampler import LengthBasedBatchSampler, RandomBatchSampler

    data = [[0] * (1 + (i * 13) % 29) for i in range(37)]

    def sampler(world, batch, rank):
        if kind == "length_grouped":
            return LengthBasedBatchSampler(data, batch, seed=5, num_replicas=world, rank=rank)
        return RandomBatchSampler(len(data), batch, seed=5, num_replicas=world, rank=rank)

    def real(batches):
        return [i for b in batches for i in b if i < len(data)]  # fillers are shifted by len(data)

    for (w0, b0), (w1, b1) in [((1, 2), (2, 2)), ((2, 2), (1, 2)), ((2, 3), (3, 1)), ((1, 4), (2, 3))]:
        for taken in range(6):
            first = [sampler(w0, b0, r) for r in range(w0)]
            for s in first:
                s.set_epoch(3)
            before = real(b for s in first for b in list(s)[:taken])
            position = first[0].position_after(taken)
            assert position == len(before) == len(set(before))
            rest = []
            for r in range(w1):
                s = sampler(w1, b1, r)
                s.set_epoch(3)
                s.start_at(position, b0)
                rest += real(s)
                if (w1, b1) == (w0, b0):  # the same layout: exactly the batches that were left
                    assert list(s) == list(first[r])[taken:]
            assert sorted(before + rest) == list(range(len(data)))
        same = [sampler(w0, b0, r) for r in range(w0)]
        for r, s in enumerate(same):
            s.set_epoch(3)
            s.start_at(first[0].position_after(2), b0)
            full = sampler(w0, b0, r)
            full.set_epoch(3)
            assert list(s) == list(full)[2:]
