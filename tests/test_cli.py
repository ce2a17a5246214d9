"""The command line: flag names of the reference, typed coercion, one-line errors, --help, --config."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from conftest import HANG_TIMEOUT_S

from shardtune import configs as C
from shardtune.cli import cli
from shardtune.configs import ShardingStrategy, StateDictType
from shardtune.configs.parse import parse_cli
from shardtune.configs.run import RunConfigs
from shardtune.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_reference_flags_and_coercion():
    run = parse_cli({
        "model_name": "some/model", "use_peft": True, "peft_method": "lora", "lr": "3e-4",
        "batch_size_training": "2", "fsdp_config.sharding_strategy": "HYBRID_SHARD",
        "fsdp_config.checkpoint_type": "StateDictType.FULL_STATE_DICT",
        "lora_config.target_modules": ("q_proj", "k_proj"),  # fire turns q_proj,k_proj into a tuple
        "alpaca_dataset.data_path": "x.json", "enable_fsdp": "true", "quantization_config.compute_dtype": "float16",
        "quantization": "4bit", "wandb_config.tags": "a,b", "use_wandb": True,
    })
    assert run.train.lr == pytest.approx(3e-4) and run.train.batch_size_training == 2 and run.train.enable_fsdp
    assert run.fsdp.sharding_strategy is ShardingStrategy.HYBRID_SHARD
    assert run.fsdp.checkpoint_type is StateDictType.FULL_STATE_DICT
    assert run.peft.target_modules == ["q_proj", "k_proj"]
    assert run.dataset.data_path == "x.json"
    assert str(run.quantization.compute_dtype) == "torch.float16"
    assert run.wandb.tags == ["a", "b"]
    assert parse_cli({"use_peft": True, "lora_config.target_modules": "[q_proj, v_proj, o_proj]"}).peft.target_modules == [
        "q_proj", "v_proj", "o_proj"]


def test_plain_key_goes_to_first_config_that_has_it():
    run = parse_cli({"use_fp16": True, "use_peft": True, "r": 16, "bias": "lora_only", "task_type": "CAUSAL_LM"})
    assert run.train.use_fp16 and not run.fsdp.use_fp16          # train_config first
    assert run.peft_configs["lora"].r == 16 and run.peft_configs["lora"].bias == "lora_only"
    run = parse_cli({"fsdp_config.use_fp16": True})
    assert run.fsdp.use_fp16 and not run.train.use_fp16
    # the active dataset config gets a plain dataset key
    run = parse_cli({"dataset": "grammar_dataset", "train_split": "g.csv"})
    assert run.dataset_configs["grammar_dataset"].train_split == "g.csv"
    assert run.dataset_configs["alpaca_dataset"].train_split == "train"


@pytest.mark.parametrize("kwargs, expected", [
    ({"lrr": 1e-4}, "unknown flag --lrr; did you mean --lr"),
    ({"fsdp_config.sharding_strategy": "HALF_SHARD"}, "--fsdp_config.sharding_strategy: expected one of FULL_SHARD"),
    ({"batch_size_training": "four"}, "--batch_size_training: expected an int, got 'four'"),
    ({"use_peft": "maybe"}, "--use_peft: expected a bool"),
    ({"flop_counter": True, "use_profiler": True}, "--flop_counter and --use_profiler cannot be combined"),
    ({"flop_counter": True, "max_train_step": 2, "flop_counter_start": 3}, "must be greater than --flop_counter_start"),
    ({"enable_fsdp": True, "fsdp_config.hsdp": True, "fsdp_config.sharding_strategy": "HYBRID_SHARD"},
     "--sharding_group_size"),
    ({"dataset": "imagenet"}, "--dataset: unknown data set 'imagenet'"),
    ({"peft_method": "ia3"}, "--peft_method: unknown method 'ia3'"),
    ({"nosuch_config.x": 1}, "'nosuch_config' is not a config"),
    ({"fsdp_config.a.b": 1}, "use one dot"),
    ({"lora_config.bias": "some"}, "--lora_config.bias: expected one of"),
    ({"from_peft_checkpoint": "x"}, "--from_peft_checkpoint has no effect without --use_peft"),
    ({"lora_config.r": 16}, "--lora_config.r has no effect without --use_peft"),
])
def test_bad_input_is_one_clear_line(kwargs, expected):
    with pytest.raises(ConfigError) as err:
        parse_cli(kwargs)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg


def test_cli_exit_code_2_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(["--lrr", "1e-4", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "--lrr" in line and "--lr?" in line  # the flag, and the one meant
    assert not out.exists()
    # a missing model folder fails before anything is created either
    rc = cli(["--model_name", str(tmp_path / "no_such_model"), "--output_dir", str(out)])
    assert rc == 2 and str(tmp_path / "no_such_model") in capsys.readouterr().err and not out.exists()


def test_real_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "finetuning.py"), "--fsdp_config.sharding_strategy", "X",
                           "--output_dir", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --fsdp_config.sharding_strategy: expected one of")


def test_help_is_a_short_usage_then_one_aligned_row_per_field(capsys, monkeypatch):
    from shardtune.configs.help import USAGE, format_help

    monkeypatch.setenv("COLUMNS", "100")  # a terminal of the widest --help (pytest-xdist workers report 80 columns)
    assert cli(["--help"]) == 0
    text = capsys.readouterr().out
    assert text == format_help() + "\n" and text.startswith(USAGE)
    assert len(text.splitlines()) < 180  # one row per field (169 before async_checkpoint); was 264 with the dataclass signatures and RST markup
    assert "``" not in text and ":class:" not in text and "train_config(" not in text
    run = RunConfigs()
    for name, cfg in run.by_name().items():
        (title,) = [ln for ln in text.splitlines() if ln.startswith(f"{name}: ")]
        assert len(title) > len(name) + 10, f"{name} needs a one-sentence docstring"
        for f in fields(cfg):
            assert f.metadata.get("help"), f"{name}.{f.name} has no documentation"
            assert re.search(rf"^  --(({name})\.)?{f.name} ", text, re.M), f"no row for {name}.{f.name}"
    rows = [ln for ln in text.split("\nfsdp_config: ")[1].split("\n\n")[0].splitlines() if ln.startswith("  --")]
    assert len(rows) == len(fields(C.fsdp_config))  # one line per field, columns aligned
    assert len({ln.index(ln.split()[1], len(ln.split()[0]) + 2) for ln in rows}) == 1
    assert re.search(r"^  --sharding_strategy +choice +FULL_SHARD +FULL_SHARD \| SHARD_GRAD_OP", text, re.M)
    assert re.search(r"^  --fsdp_config\.use_fp16 +bool +False", text, re.M)  # plain --use_fp16 is train_config's
    assert re.search(r"^  --model_name +str +\(bundled\) +Hugging Face", text, re.M)


def test_help_for_one_config_shows_its_whole_docs(capsys):
    assert cli(["--help", "fsdp_config"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("fsdp_config: ") and "train_config" not in text and "usage:" not in text
    assert "on one GPU and on CPU alike" in " ".join(text.split())  # the whole help text, wrapped
    assert cli(["--help=lora_config"]) == 0 and capsys.readouterr().out.startswith("lora_config: ")
    assert cli(["--help", "nope"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: --help") and "'nope'" in line and all(name in line for name in RunConfigs().by_name())


def test_config_file_and_command_line_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"lr": 2e-4, "num_epochs": 5, "fsdp_config": {"pure_bf16": True},
                                   "lora_config.r": 4, "use_peft": True}))
    run = parse_cli({"config": str(cfg), "num_epochs": 1})
    assert run.train.lr == pytest.approx(2e-4) and run.train.num_epochs == 1
    assert run.fsdp.pure_bf16 and run.peft_configs["lora"].r == 4
    with pytest.raises(ConfigError, match="--config: file not found"):
        parse_cli({"config": str(tmp_path / "missing.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="--config: cannot parse"):
        parse_cli({"config": str(bad)})


def test_resolved_config_round_trips(tmp_path):
    from shardtune.configs.parse import save_resolved

    run = parse_cli({"model_name": "m", "lr": 5e-5, "enable_fsdp": True,
                     "fsdp_config.sharding_strategy": "SHARD_GRAD_OP",
                     "use_peft": True, "lora_config.r": 2})
    save_resolved(run, tmp_path / "run_config.yaml")
    again = parse_cli({"config": str(tmp_path / "run_config.yaml")})
    assert again.to_dict() == run.to_dict()


def test_demo_preset_only_without_model_name():
    demo = parse_cli({})
    assert demo.demo_preset and demo.train.context_length == 512 and not demo.fsdp.fsdp_activation_checkpointing
    assert parse_cli({"fsdp_activation_checkpointing": True}).fsdp.fsdp_activation_checkpointing  # flags win
    assert parse_cli({"context_length": 64}).train.context_length == 64        # flags override the preset
    real = parse_cli({"model_name": "x/y"})
    assert not real.demo_preset and real.train.context_length == 4096 and real.train.lr == pytest.approx(1e-4)
    assert real.fsdp.fsdp_activation_checkpointing  # real models keep activation checkpointing on


def test_retired_reference_fields_warn_or_are_refused(capsys):
    """A deprecated field that is set says in one line that it has no effect; a field whose feature shardtune
    lacks stops the run; left at their defaults (as in a saved run_config.yaml) both are silent."""
    run = parse_cli({"save_optimizer": True, "one_gpu": True})
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 2 and all("deprecated" in w for w in warnings), err
    assert "--save_optimizer" in warnings[0] and "--one_gpu" in warnings[1] and run.train.save_optimizer
    with pytest.raises(ConfigError, match=r"^--freeze_LLM_only is not supported"):
        parse_cli({"freeze_LLM_only": True})
    parse_cli({"save_optimizer": False, "freeze_LLM_only": False})
    assert capsys.readouterr().err == ""


def test_changed_settings_are_those_off_their_defaults():
    from shardtune.configs.help import changed_settings, format_changed_settings

    run = parse_cli({"model_name": "some/model", "lr": 2e-4, "use_peft": True, "lora_config.r": 4,
                     "dataset": "chat_dataset", "chat_dataset.data_path": "x.jsonl"})
    assert changed_settings(run) == {"train_config": {"model_name": "some/model", "lr": 2e-4, "use_peft": True,
                                                      "dataset": "chat_dataset"},
                                     "lora_config": {"r": 4}, "chat_dataset": {"data_path": "x.jsonl"}}
    assert format_changed_settings(parse_cli({"model_name": str(RunConfigs().train.model_name)})) == \
        "every setting at its default"
