"""Resuming: a run stopped at a checkpoint and resumed gives exactly the losses of the uninterrupted run
(fp32 CPU), mid-epoch and across an epoch boundary, sharded and full checkpoints, 2 ranks and 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardtune.utils.config_utils import ConfigError, parse_cli
from test_fsdp_support import base_kwargs, run_ranks, step_losses


def _records(out_dir, kind):
    recs = []
    for path in sorted(Path(out_dir).glob("metrics_*.jsonl")):
        recs += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if r["kind"] == kind]


def _interrupted_vs_uninterrupted(tmp_path, model_dir, world, stop_at, total, resume_from="auto", **flags):
    """Run A straight to `total` steps; run B to `stop_at` (checkpoint there), then resume B to `total`."""
    run_ranks(world, base_kwargs(model_dir, tmp_path / "A", max_train_step=total, **flags), tmp_path / "ra")
    b = base_kwargs(model_dir, tmp_path / "B", max_train_step=stop_at, save_every_n_steps=stop_at, **flags)
    run_ranks(world, b, tmp_path / "rb1")
    resume = resume_from if resume_from == "auto" else str(tmp_path / "B" / "checkpoints" / "fine-tuned" /
                                                             resume_from)
    results = run_ranks(world, {**b, "max_train_step": total, "save_every_n_steps": 0, "resume_from": resume},
                        tmp_path / "rb2")
    assert "--> resuming from" in results[0]["log"]
    a, b = step_losses(tmp_path / "A"), step_losses(tmp_path / "B")
    assert len(a) == total
    return a, b


@pytest.mark.parametrize("case", ["sharded", "lora_ga_dropout", "full_state_dict", "single_process",
                                  "bf16_pure_anyprecision"])
def test_resume_mid_epoch_is_exact(case, tiny_llama_dir, tmp_path):
    flags, world, resume_from = {}, 2, "auto"
    if case == "bf16_pure_anyprecision":  # bf16 moments and Kahan compensation through DCP
        flags = {"precision": "bf16_pure", "fsdp_config.optimizer": "anyprecision", "use_kahan_summation": True}
    if case == "lora_ga_dropout":  # dropout draws from the RNG: only an exact RNG restore reproduces it
        flags, resume_from = dict(use_peft=True, gradient_accumulation_steps=2), "step_000003"
    if case == "full_state_dict":
        flags = {"fsdp_config.checkpoint_type": "FULL_STATE_DICT"}
    if case == "single_process":  # no process group: DCP without one
        flags, world = dict(enable_fsdp=False, use_peft=True), 1
    a, b = _interrupted_vs_uninterrupted(tmp_path, tiny_llama_dir, world, 3, 6, resume_from, **flags)
    assert b == a  # exactly
    # the epoch summary of the resumed run covers the whole epoch, as the uninterrupted one
    (ea,), eb = _records(tmp_path / "A", "epoch"), _records(tmp_path / "B", "epoch")
    assert eb[-1]["train_loss"] == ea["train_loss"]


def _small_alpaca(tmp_path, n=24) -> str:
    from shardtune.configs.paths import BUNDLED_ALPACA_SAMPLE

    records = json.loads(Path(BUNDLED_ALPACA_SAMPLE).read_text())[:n]
    path = tmp_path / "small_alpaca.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_resume_across_an_epoch_boundary_is_exact(tiny_llama_dir, tmp_path):
    """A 2-epoch run vs 1 epoch (end-of-epoch checkpoint: LR already decayed, RNG before the next epoch's
    data iterator) + resume for epoch 2. LoRA dropout makes the RNG matter; gamma makes the LR matter."""
    flags = dict(use_peft=True, gamma=0.5, save_model=True, max_train_step=0,
                 **{"alpaca_dataset.data_path": _small_alpaca(tmp_path)})
    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "A", num_epochs=2, **flags), tmp_path / "ra")
    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "B", num_epochs=1, **flags), tmp_path / "rb1")
    state = json.loads((next((tmp_path / "B" / "checkpoints" / "fine-tuned").glob("step_*")) / "state.json")
                       .read_text())["train_state"]
    assert state["epoch"] == 1 and state["batches_in_epoch"] == 0
    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "B", num_epochs=2, resume_from="auto", **flags),
              tmp_path / "rb2")
    a, b = _records(tmp_path / "A", "train_step"), _records(tmp_path / "B", "train_step")
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["lr"] for r in b] == [r["lr"] for r in a] and a[-1]["lr"] == a[0]["lr"] * 0.5
    assert [r["epoch"] for r in a][-1] == 1


def test_resume_flag_errors_and_auto_without_checkpoint(tmp_path):
    from shardtune.model_checkpointing.checkpoint import find_resume_point

    auto = parse_cli({"model_name": "unused", "output_dir": str(tmp_path), "resume_from": "auto"})
    assert find_resume_point(auto) is None  # nothing saved yet: start from scratch
    missing = parse_cli({"model_name": "unused", "output_dir": str(tmp_path), "resume_from": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="is not a complete checkpoint") as e:
        find_resume_point(missing)
    assert "\n" not in str(e.value)
