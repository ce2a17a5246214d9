"""Resuming: a run stopped at a checkpoint and resumed gives exactly the losses of the uninterrupted run
(fp32 CPU), mid-epoch and across an epoch boundary, sharded and full checkpoints, 2 ranks and 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_fsdp_support import base_kwargs, first_trained_step, log_line, run_ranks, step_losses

from shardtune.configs.parse import parse_cli
from shardtune.errors import ConfigError
from shardtune.observability.metrics import read_metrics as _records


def _interrupted_vs_uninterrupted(tmp_path, model_dir, world, stop_at, total, resume_from="auto", saving=None,
                                  **flags):
    """Run A straight to `total` steps; run B to `stop_at` (checkpoint there, with the flags `saving`), then resume
    B to `total`."""
    run_ranks(world, base_kwargs(model_dir, tmp_path / "A", max_train_step=total, **flags), tmp_path / "ra")
    b = base_kwargs(model_dir, tmp_path / "B", max_train_step=stop_at, save_every_n_steps=stop_at, **flags)
    run_ranks(world, {**b, **(saving or {})}, tmp_path / "rb1")
    resume = resume_from if resume_from == "auto" else str(tmp_path / "B" / "checkpoints" / "fine-tuned" /
                                                             resume_from)
    run_ranks(world, {**b, "max_train_step": total, "save_every_n_steps": 0, "resume_from": resume}, tmp_path / "rb2")
    assert first_trained_step(tmp_path / "B") == stop_at + 1  # resumed, not retrained from step 1
    a, b = step_losses(tmp_path / "A"), step_losses(tmp_path / "B")
    assert len(a) == total
    return a, b


@pytest.mark.parametrize("case", ["sharded", "sharded_synchronous", "lora_ga_dropout", "full_state_dict",
                                  "single_process", "bf16_pure_anyprecision"])
def test_resume_mid_epoch_is_exact(case, tiny_llama_dir, tmp_path):
    flags, world, resume_from, saving = {}, 2, "auto", None
    if case == "sharded_synchronous":  # "sharded" writes its periodic checkpoint in the background (the default)
        saving = {"fsdp_config.async_checkpoint": False}
    if case == "bf16_pure_anyprecision":  # bf16 moments and Kahan compensation through DCP
        flags = {"precision": "bf16_pure", "fsdp_config.optimizer": "anyprecision", "use_kahan_summation": True}
    if case == "lora_ga_dropout":  # dropout draws from the RNG: only an exact RNG restore reproduces it
        flags, resume_from = dict(use_peft=True, gradient_accumulation_steps=2), "step_000003"
    if case == "full_state_dict":
        flags = {"fsdp_config.checkpoint_type": "FULL_STATE_DICT"}
    if case == "single_process":  # no process group: DCP without one
        flags, world = dict(enable_fsdp=False, use_peft=True), 1
    a, b = _interrupted_vs_uninterrupted(tmp_path, tiny_llama_dir, world, 3, 6, resume_from, saving, **flags)
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
    from shardtune.model_checkpointing.resume import find_resume_point

    auto = parse_cli({"model_name": "unused", "output_dir": str(tmp_path), "resume_from": "auto"})
    assert find_resume_point(auto) is None  # nothing saved yet: start from scratch
    missing = parse_cli({"model_name": "unused", "output_dir": str(tmp_path), "resume_from": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="is not a complete checkpoint") as e:
        find_resume_point(missing)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Resumes that must be exact, and those that must be refused
# ---------------------------------------------------------------------------------------------
def _ckpt_root(out):
    return Path(out) / "checkpoints" / "fine-tuned"


def test_a_finished_run_resumed_does_nothing_and_says_so(tiny_llama_dir, tmp_path):
    flags = dict(use_peft=True, save_model=True, max_train_step=3, save_every_n_steps=3)
    run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "out", **flags), tmp_path / "r1")
    adapter = tmp_path / "out" / "model" / "adapter_model.safetensors"
    before, mtime = adapter.read_bytes(), adapter.stat().st_mtime_ns
    results = run_ranks(2, base_kwargs(tiny_llama_dir, tmp_path / "out", resume_from="auto", **flags),
                        tmp_path / "r2")
    assert results[0]["summary"] == {"steps": 3, "already_finished": True}
    assert len(step_losses(tmp_path / "out")) == 3  # no extra step
    assert adapter.read_bytes() == before and adapter.stat().st_mtime_ns == mtime  # not re-exported


def test_evaluation_does_not_move_the_rng_a_checkpoint_saves(tiny_llama_dir, tmp_path):
    """LoRA dropout (default 0.05): stop at step 3 (evaluation, then the checkpoint), resume to 6 == 6 straight."""
    flags = dict(use_peft=True, run_validation=True, max_eval_step=2)
    a, b = _interrupted_vs_uninterrupted(tmp_path, tiny_llama_dir, 2, 3, 6, **flags)
    assert b == a


KILL_POINTS = {  # where the run is SIGKILLed: (module, function, on which call)
    "during_a_checkpoint_save": ("shardtune.model_checkpointing.integrity", "write_manifest", 2),  # shards written
    "during_the_final_export": ("shardtune.model_checkpointing.export", "check_adapter", 1),  # files half written
}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_a_killed_run_resumed_ends_with_the_uninterrupted_result(point, world, tiny_llama_dir, tmp_path, monkeypatch):
    """SIGKILL in the middle of writing (a checkpoint's shards are on disk but it is not complete; or the adapter
    export after the last checkpoint), then --resume_from auto: the final adapter is byte-identical to the
    uninterrupted run's (LoRA dropout on: the RNG streams are restored too), and no leftover remains."""
    import importlib
    import os
    import signal

    flags = dict(use_peft=True, save_model=True, max_train_step=3, save_every_n_steps=1, enable_fsdp=world > 1,
                 batch_size_training=4 // world)
    run_ranks(world, base_kwargs(tiny_llama_dir, tmp_path / "A", **flags), tmp_path / "ra")
    module, name, nth = KILL_POINTS[point]
    calls = []

    def killed_while_writing(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    original = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(importlib.import_module(module), name, killed_while_writing)  # inherited by forked ranks
    with pytest.raises(Exception, match="SIGKILL|died without a result"):
        run_ranks(world, base_kwargs(tiny_llama_dir, tmp_path / "B", **flags), tmp_path / "rb1")
    monkeypatch.undo()
    out = tmp_path / "B"
    assert not (out / "model").exists()
    run_ranks(world, base_kwargs(tiny_llama_dir, out, resume_from="auto", **flags), tmp_path / "rb2")
    leftovers = [p for d in (out, _ckpt_root(out)) for p in d.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    a = (tmp_path / "A" / "model" / "adapter_model.safetensors").read_bytes()
    assert (out / "model" / "adapter_model.safetensors").read_bytes() == a


@pytest.mark.parametrize("damage", ["truncated_shard", "zeroed_shard", "missing_shard", "missing_metadata",
                                    "empty_state", "flipped_byte"])
def test_a_damaged_newest_checkpoint_is_skipped(damage, tiny_llama_dir, tmp_path, checkpoints_1_2_3):
    import shutil

    from shardtune.model_checkpointing.resume import find_resume_point

    out = tmp_path / "out"
    shutil.copytree(checkpoints_1_2_3, out)
    newest = _ckpt_root(out) / "step_000003"
    shard = newest / "__0_0.distcp"
    if damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "zeroed_shard":
        shard.write_bytes(bytes(shard.stat().st_size))
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "missing_metadata":
        (newest / ".metadata").unlink()
    elif damage == "empty_state":
        (newest / "state.json").write_text("")
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    run = parse_cli(base_kwargs(tiny_llama_dir, out, enable_fsdp=False, resume_from="auto"))
    point = find_resume_point(run, json.loads((out / "run.json").read_text())["run_id"])
    assert point.path.name == "step_000002"  # the newest intact one
    named = parse_cli(base_kwargs(tiny_llama_dir, out, enable_fsdp=False, resume_from=str(newest)))
    with pytest.raises(ConfigError, match=r"step_000003") as e:
        find_resume_point(named)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def checkpoints_1_2_3(tiny_llama_dir, tmp_path_factory):
    """One single-process run with a sharded checkpoint after each of 3 steps."""
    out = tmp_path_factory.mktemp("ckpts") / "out"
    run_ranks(1, base_kwargs(tiny_llama_dir, out, enable_fsdp=False, save_every_n_steps=1, keep_last_n_checkpoints=3),
              out.parent / "ranks")
    assert [p.name for p in sorted(_ckpt_root(out).iterdir())] == ["step_000001", "step_000002", "step_000003"]
    return out


def test_resume_from_corrupted_bytes_falls_back_and_continues_exactly(tiny_llama_dir, tmp_path,
                                                                     checkpoints_1_2_3):
    """End to end: the newest checkpoint has a flipped byte; auto resumes step 2 and redoes step 3 exactly."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(checkpoints_1_2_3, out)
    shard = _ckpt_root(out) / "step_000003" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0x01
    shard.write_bytes(bytes(data))
    results = run_ranks(1, base_kwargs(tiny_llama_dir, out, enable_fsdp=False, max_train_step=4, resume_from="auto"),
                        tmp_path / "r")
    assert "step_000003" in log_line(results[0]["log"], "__0_0.distcp")  # one warning names the damaged file
    losses = step_losses(out)  # steps 1-3 of the first run, then 3 (again) and 4
    assert len(losses) == 5 and losses[3] == losses[2]


def test_resuming_keeps_the_users_config_in_every_later_checkpoint(tiny_llama_dir, tmp_path):
    """A PEFT run with FULL_STATE_DICT checkpoints resumes from the checkpoint's adapter folder. That folder is
    run state: the run_config.yaml of later checkpoints keeps the user's --from_peft_checkpoint (empty), so it
    never points into a checkpoint that pruning deletes, and the newest checkpoint still converts."""
    import yaml

    from shardtune.finetuning import main
    from shardtune.model_checkpointing.convert import convert

    out = tmp_path / "out"
    flags = base_kwargs(tiny_llama_dir, out, enable_fsdp=False, use_peft=True, save_every_n_steps=1,
                        keep_last_n_checkpoints=1, **{"fsdp_config.checkpoint_type": "FULL_STATE_DICT"})
    main(**{**flags, "max_train_step": 2})
    root = out / "checkpoints" / "fine-tuned"
    (first,) = root.glob("step_*")
    main(**{**flags, "max_train_step": 4, "resume_from": "auto"})
    (newest,) = root.glob("step_*")
    assert newest.name == "step_000004" and not first.exists()  # the resumed-from checkpoint was pruned
    saved = yaml.safe_load((newest / "run_config.yaml").read_text())
    assert saved["train_config"]["from_peft_checkpoint"] == ""
    assert saved == yaml.safe_load((out / "run_config.yaml").read_text())
    assert (convert(newest, tmp_path / "converted") / "adapter_config.json").is_file()
