"""Every file of a real checkpoint, three faults each (one byte changed, emptied, deleted): never a silent resume.

Real short runs write two checkpoints (steps 1 and 2): a 2-rank torchrun (gloo, SHARDED_STATE_DICT), one process
(SHARDED_STATE_DICT; its step 2 is re-sealed at the end of the run, when the epoch's state is written), and one
process with LoRA and FULL_STATE_DICT (the adapter and tokenizer files of model/). The matrix is parametrised
over the files each of them holds, and a test checks that list against the real folder, so that a file added to
checkpoints later cannot go untested. For each file and fault, on a copy: ``--resume_from auto`` falls back to
step 1 with one warning line naming the damaged file, and an explicit ``--resume_from`` refuses with one line
naming it. The bulk calls the resume decision directly; a few end-to-end runs check the real exit status and
which step the resumed run trained from (its metrics file).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT_S
from fresh_cli import FreshCli
from test_fsdp_support import base_kwargs, first_trained_step, run_ranks

from shardtune.configs.parse import parse_cli
from shardtune.errors import ConfigError
from shardtune.model_checkpointing import integrity
from shardtune.model_checkpointing.resume import find_resume_point

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), SHARDTUNE_PG_TIMEOUT_S="600")
STEPS = dict(max_train_step=2, save_every_n_steps=1, keep_last_n_checkpoints=2)
SOURCES = {  # name: (world size, flags of the run that writes the checkpoints)
    "torchrun_sharded": (2, {}),
    "single_sharded": (1, dict(enable_fsdp=False, save_model=True)),
    "single_full_lora": (1, {"enable_fsdp": False, "use_peft": True, "fsdp_config.checkpoint_type": "FULL_STATE_DICT"}),
}
FILES = {  # every file of each source's checkpoint (checked against the real folder below)
    "torchrun_sharded": [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "rng/rank_00000.pt",
                         "rng/rank_00001.pt", "run_config.yaml", "state.json"],
    "single_sharded": [".metadata", "__0_0.distcp", "manifest.json", "rng/rank_00000.pt", "run_config.yaml",
                       "state.json"],
    "single_full_lora": ["manifest.json", "model/adapter_config.json", "model/adapter_model.safetensors",
                         "model/chat_template.jinja", "model/tokenizer.json", "model/tokenizer_config.json",
                         "optimizer.json", "optimizer.safetensors", "rng/rank_00000.pt", "run_config.yaml",
                         "state.json"],
}
MATRIX = [(source, name) for source in SOURCES for name in FILES[source]]


def cli_args(kwargs: dict) -> list:
    return [x for k, v in kwargs.items() for x in (f"--{k}", str(v))]


def ckpt_root(out: Path) -> Path:
    return out / "checkpoints" / "fine-tuned"


# ---------------------------------------------------------------------------------------------
# The faults
# ---------------------------------------------------------------------------------------------
def change_one_byte(path: Path) -> None:
    """Text files: one digit changed (the file stays valid, as an edited step count would); else one bit flipped."""
    data = bytearray(path.read_bytes())
    digits = [i for i, b in enumerate(data) if chr(b).isdigit()] if path.suffix in (".json", ".yaml", ".md") else []
    if digits:
        i = digits[len(digits) // 2]
        data[i] = ord(str((int(chr(data[i])) + 1) % 10))
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


FAULTS = {"byte_changed": change_one_byte, "emptied": lambda p: p.write_bytes(b""), "deleted": Path.unlink}


# ---------------------------------------------------------------------------------------------
# The checkpoints: written once per source by a real run
# ---------------------------------------------------------------------------------------------
def _torchrun(args: list, log: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "finetuning.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def source_kwargs(source: str, model_dir, out: Path, **overrides) -> dict:
    return base_kwargs(model_dir, out, **{**STEPS, **SOURCES[source][1], **overrides})


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    """source -> the output folder of a real run that checkpointed steps 1 and 2 (written on first use)."""
    written = {}

    def get(source: str) -> Path:
        if source not in written:
            out = tmp_path_factory.mktemp(source) / "out"
            world, _ = SOURCES[source]
            kwargs = source_kwargs(source, tiny_llama_dir, out)
            if world == 2:
                proc = _torchrun(cli_args(kwargs), out.parent / "run.log")
                assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
            else:
                run_ranks(1, kwargs, out.parent / "ranks")
            assert [p.name for p in sorted(ckpt_root(out).iterdir())] == ["step_000001", "step_000002"]
            written[source] = out
        return written[source]

    return get


def damaged_copy(saved_out: Path, tmp_path: Path, name: str, fault: str) -> Path:
    out = tmp_path / "out"
    shutil.copytree(saved_out, out)
    FAULTS[fault](ckpt_root(out) / "step_000002" / name)
    return out


def run_id(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run_id"]


def warnings_naming(stderr: str, text: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.startswith("warning: ") and text in ln]


# ---------------------------------------------------------------------------------------------
# The matrix: every file x every fault, decided by the real resume code
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_the_matrix_covers_every_file_of_the_checkpoint(source, saved):
    for step in ("step_000001", "step_000002"):
        folder = ckpt_root(saved(source)) / step
        assert integrity.list_files(folder) == FILES[source]
        assert integrity.verify(folder).problems == []  # as written: intact
    manifest = integrity.read_manifest(ckpt_root(saved(source)) / "step_000002")
    assert sorted(manifest) == [n for n in FILES[source] if n != integrity.MANIFEST]  # everything but itself
    if source == "single_sharded":  # step 2's state.json was rewritten at the end of the run (re-sealed, above)
        assert json.loads((ckpt_root(saved(source)) / "step_000002" / "state.json").read_text())["export_due"]


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("source, name", MATRIX, ids=[f"{s}-{n}" for s, n in MATRIX])
def test_a_fault_in_any_file_is_never_resumed_silently(source, name, fault, saved, tiny_llama_dir, tmp_path, capsys):
    out = damaged_copy(saved(source), tmp_path, name, fault)
    world, _ = SOURCES[source]
    damaged = f"step_000002/{name}"
    capsys.readouterr()
    auto = parse_cli(source_kwargs(source, tiny_llama_dir, out, resume_from="auto"))
    point = find_resume_point(auto, run_id(out), world)
    assert point.path.name == "step_000001" and point.step == 1  # the older, intact one
    lines = warnings_naming(capsys.readouterr().err, "step_000002")
    assert len(lines) == 1 and damaged in lines[0], lines

    explicit = parse_cli(source_kwargs(source, tiny_llama_dir, out, resume_from=str(ckpt_root(out) / "step_000002")))
    with pytest.raises(ConfigError) as refused:
        find_resume_point(explicit, run_id(out), world)
    assert damaged in str(refused.value) and "\n" not in str(refused.value)


def test_an_extra_file_fails_verification(saved, tiny_llama_dir, tmp_path, capsys):
    """A file the checkpoint was not saved with (here an adapter weights file the loader would pick up)."""
    out = tmp_path / "out"
    shutil.copytree(saved("single_full_lora"), out)
    extra = ckpt_root(out) / "step_000002" / "model" / "adapter_model.bin"
    extra.write_bytes(b"\0" * 16)
    point = find_resume_point(parse_cli(source_kwargs("single_full_lora", tiny_llama_dir, out, resume_from="auto")),
                              run_id(out))
    assert point.step == 1
    assert len(warnings_naming(capsys.readouterr().err, "step_000002/model/adapter_model.bin")) == 1


def test_no_valid_checkpoint_is_refused_not_a_fresh_start(saved, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(saved("single_sharded"), out)
    for step in ("step_000001", "step_000002"):
        change_one_byte(ckpt_root(out) / step / "state.json")
    with pytest.raises(ConfigError, match="none of the 2 checkpoint") as refused:
        find_resume_point(parse_cli(source_kwargs("single_sharded", tiny_llama_dir, out, resume_from="auto")),
                          run_id(out))
    assert "step_000002/state.json" in str(refused.value)


# ---------------------------------------------------------------------------------------------
# No manifest: only with --resume_unverified and an explicit folder
# ---------------------------------------------------------------------------------------------
def test_a_checkpoint_without_manifest_needs_the_explicit_flag(saved, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(saved("single_sharded"), out)
    newest = ckpt_root(out) / "step_000002"
    (newest / integrity.MANIFEST).unlink()
    with pytest.raises(ConfigError, match="--resume_unverified"):
        find_resume_point(parse_cli(source_kwargs("single_sharded", tiny_llama_dir, out, resume_from=str(newest))))
    allowed = parse_cli(source_kwargs("single_sharded", tiny_llama_dir, out, resume_from=str(newest),
                                      resume_unverified=True))
    assert find_resume_point(allowed, run_id(out)).step == 2
    assert len(warnings_naming(capsys.readouterr().err, "unverified")) == 1
    for resume_from in ("auto", ""):
        with pytest.raises(ConfigError, match="--resume_unverified"):
            find_resume_point(parse_cli(source_kwargs("single_sharded", tiny_llama_dir, out, resume_from=resume_from,
                                                      resume_unverified=True)))


# ---------------------------------------------------------------------------------------------
# Checkpoints of the previous format (checksums.json over weights, optimizer and RNG only)
# ---------------------------------------------------------------------------------------------
def as_format_1(folder: Path) -> None:
    """Rewrite a checkpoint as format 1 wrote it: checksums.json ({file: [size, crc]}) over every file but state.json
    and run_config.yaml (written after it), and format 1 in state.json."""
    (folder / integrity.MANIFEST).unlink()
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "format": 1}, indent=2) + "\n")
    listed = [n for n in integrity.list_files(folder) if n not in ("state.json", "run_config.yaml")]
    digests = {n: integrity.file_digest(folder / n) for n in listed}
    (folder / integrity.LEGACY_MANIFEST).write_text(json.dumps(digests, indent=0, sort_keys=True) + "\n")


def test_a_format_1_checkpoint_still_resumes_with_one_warning(saved, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(saved("single_sharded"), out)
    for step in ("step_000001", "step_000002"):
        as_format_1(ckpt_root(out) / step)
    kwargs = source_kwargs("single_sharded", tiny_llama_dir, out, resume_from="auto", max_train_step=3)
    log = run_ranks(1, kwargs, tmp_path / "r")[0]["log"]
    assert first_trained_step(out) == 3  # resumed from step 2
    lines = [ln for ln in log.splitlines() if ln.startswith("warning: ") and "format 1" in ln]
    assert len(lines) == 1 and "state.json" in lines[0] and "not covered" in lines[0]
    new = ckpt_root(out) / "step_000003"  # written by this version: fully covered
    assert integrity.verify(new).coverage is integrity.Coverage.FULL and not integrity.verify(new).problems


def test_a_format_1_checkpoint_is_verified_as_far_as_it_goes(saved, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(saved("single_sharded"), out)
    for step in ("step_000001", "step_000002"):
        as_format_1(ckpt_root(out) / step)
    change_one_byte(ckpt_root(out) / "step_000002" / "__0_0.distcp")
    point = find_resume_point(parse_cli(source_kwargs("single_sharded", tiny_llama_dir, out, resume_from="auto")),
                              run_id(out))
    assert point.step == 1
    assert len(warnings_naming(capsys.readouterr().err, "step_000002/__0_0.distcp")) == 1


# ---------------------------------------------------------------------------------------------
# End to end: the real exit status, and the step the resumed run continued from
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_cli():
    server = FreshCli(ENV)
    yield server
    server.close()


def test_cli_single_process(saved, tiny_llama_dir, tmp_path, fresh_cli):
    """A changed digit in state.json: auto resumes step 1 (exit 0, one warning); named explicitly: exit 2, one line."""
    out = damaged_copy(saved("single_sharded"), tmp_path, "state.json", "byte_changed")
    args = cli_args(source_kwargs("single_sharded", tiny_llama_dir, out, resume_from="auto"))
    rc, stdout, stderr = fresh_cli.run(args, tmp_path, tmp_path)
    assert rc == 0, stderr[-3000:]
    assert len(warnings_naming(stderr, "step_000002/state.json")) == 1
    assert first_trained_step(out) == 2

    out2 = damaged_copy(saved("single_sharded"), tmp_path / "b", "rng/rank_00000.pt", "emptied")
    newest = ckpt_root(out2) / "step_000002"
    args = cli_args(source_kwargs("single_sharded", tiny_llama_dir, out2, resume_from=str(newest)))
    before = (out2 / "summary.json").read_text()  # the first run's
    rc, stdout, stderr = fresh_cli.run(args, tmp_path, tmp_path)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "step_000002/rng/rank_00000.pt" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr and (out2 / "summary.json").read_text() == before  # nothing trained


def test_cli_torchrun(saved, tiny_llama_dir, tmp_path):
    """2 ranks: rank 1's RNG file changed -> rank 0 judges it for both, auto resumes step 1; rank 1's shard emptied
    and named explicitly -> every rank refuses, exit status 2, one line."""
    out = damaged_copy(saved("torchrun_sharded"), tmp_path, "rng/rank_00001.pt", "byte_changed")
    proc = _torchrun(cli_args(source_kwargs("torchrun_sharded", tiny_llama_dir, out, resume_from="auto")),
                     tmp_path / "auto.log")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert first_trained_step(out) == 2  # resumed from step 1
    assert len(warnings_naming(proc.stderr, "step_000002/rng/rank_00001.pt")) == 1

    out2 = damaged_copy(saved("torchrun_sharded"), tmp_path / "b", "__1_0.distcp", "emptied")
    newest = ckpt_root(out2) / "step_000002"
    proc = _torchrun(cli_args(source_kwargs("torchrun_sharded", tiny_llama_dir, out2, resume_from=str(newest))),
                     tmp_path / "explicit.log")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "step_000002/__1_0.distcp" in errors[0]
