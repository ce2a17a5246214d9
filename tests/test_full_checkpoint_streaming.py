"""FULL_STATE_DICT checkpoints write the optimizer state tensor by tensor: safetensors shards and optimizer.json
that read without the training code, rank 0's host memory bounded by one shard (measured on two FSDP2 ranks, the
old whole-state path measured over the bound), the state restored exactly, and checkpoints of the old format
(optimizer.pt) still resume exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_TIMEOUT_S
from safetensors import safe_open
from test_fsdp_support import base_kwargs, free_port, run_ranks, step_losses

from shardtune.model_checkpointing import integrity
from shardtune.model_checkpointing.export import export_pretrained
from shardtune.model_checkpointing.weights import MODEL_DIR, ModelState

FULL = {"fsdp_config.checkpoint_type": "FULL_STATE_DICT"}


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / "fine-tuned" / f"step_{step:06d}"


def _interrupted_vs_uninterrupted(tmp_path: Path, model_dir, world: int, **flags):
    """Run A straight to 4 steps; run B to 2 (checkpoint there), then B resumed to 4. Returns both runs' losses."""
    run_ranks(world, base_kwargs(model_dir, tmp_path / "A", max_train_step=4, **flags), tmp_path / "ra")
    b = base_kwargs(model_dir, tmp_path / "B", max_train_step=2, save_every_n_steps=2, **flags)
    run_ranks(world, b, tmp_path / "rb1")
    results = run_ranks(world, {**b, "max_train_step": 4, "save_every_n_steps": 0, "resume_from": "auto"},
                        tmp_path / "rb2")
    assert "--> resuming from" in results[0]["log"]
    return step_losses(tmp_path / "A"), step_losses(tmp_path / "B")


# ---------------------------------------------------------------------------------------------
# One process, no FSDP: the files, readable by name, and an exact resume from them
# ---------------------------------------------------------------------------------------------
def test_one_process_writes_the_optimizer_by_parameter_name_and_resumes_exactly(tiny_llama_dir, tmp_path):
    a, b = _interrupted_vs_uninterrupted(tmp_path, tiny_llama_dir, 1, enable_fsdp=False, **FULL)
    assert len(a) == 4 and b[:2] + b[-2:] == a  # B: steps 1-2, then 3-4 resumed

    ckpt = _checkpoint(tmp_path / "B", 2)
    files = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.json", "optimizer.safetensors"} <= files and "optimizer.pt" not in files
    assert {"optimizer.json", "optimizer.safetensors"} <= set(integrity.read_manifest(ckpt))  # covered
    assert integrity.verify(ckpt).problems == []

    # Readable with safetensors and json alone: every weight of the model folder has its two moments, keyed by the
    # weight's own name, with its shape; the step is a number.
    info = json.loads((ckpt / "optimizer.json").read_text())
    with safe_open(str(ckpt / MODEL_DIR / "model.safetensors"), framework="pt") as fh:
        weights = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    with safe_open(str(ckpt / "optimizer.safetensors"), framework="pt") as fh:
        moments = {k: fh.get_tensor(k) for k in fh.keys()}
    grouped = [name for group in info["param_groups"] for name in group["params"]]
    assert set(info["state"]) == set(weights) == set(grouped) and len(grouped) == len(weights)
    for name, shape in weights.items():
        entries = info["state"][name]
        assert entries["step"]["__scalar__"] == 2.0
        assert {entries[k]["tensor"] for k in ("exp_avg", "exp_avg_sq")} == {f"{name}.exp_avg", f"{name}.exp_avg_sq"}
        assert tuple(moments[f"{name}.exp_avg"].shape) == shape and bool((moments[f"{name}.exp_avg_sq"] >= 0).all())
    assert any(bool(m.abs().sum() > 0) for m in moments.values())  # trained moments


# ---------------------------------------------------------------------------------------------
# Checkpoints of the old format (optimizer.pt, written as the code before optimizer_state.py did) still resume
# ---------------------------------------------------------------------------------------------
def _save_full_as_before(self, folder: Path, tokenizer, max_shard_size=None) -> None:
    """ModelState.save_full before optimizer_state.py: the weights streamed, the optimizer state gathered whole on
    rank 0 and torch.save'd as optimizer.pt."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from shardtune.utils import distributed

    export_pretrained(self.parts.lm, tokenizer, folder / MODEL_DIR, state_dict=self.export_tensors())
    osd = get_optimizer_state_dict(self.parts.model, self.parts.optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=self.info.distributed))
    distributed.on_rank0(lambda: torch.save(osd, folder / "optimizer.pt"), "write the checkpoint")


@pytest.mark.parametrize("world", [1, 2], ids=["one_process", "two_fsdp_ranks"])
def test_a_checkpoint_with_the_old_optimizer_file_resumes_exactly(world, monkeypatch, tiny_llama_dir, tmp_path):
    real_save_full = ModelState.save_full
    written_old = []

    def save_full(self, folder, tokenizer, **kwargs):
        if self.info.is_main:
            written_old.append(folder)
        return _save_full_as_before(self, folder, tokenizer)

    monkeypatch.setattr(ModelState, "save_full", save_full)
    flags = dict(FULL, **({"enable_fsdp": False} if world == 1 else {}))
    run_ranks(world, base_kwargs(tiny_llama_dir, tmp_path / "A", max_train_step=4, **flags), tmp_path / "ra")
    b = base_kwargs(tiny_llama_dir, tmp_path / "B", max_train_step=2, save_every_n_steps=2, **flags)
    run_ranks(world, b, tmp_path / "rb1")
    ckpt = _checkpoint(tmp_path / "B", 2)
    assert (ckpt / "optimizer.pt").is_file() and not (ckpt / "optimizer.json").exists()  # the old format
    monkeypatch.setattr(ModelState, "save_full", real_save_full)
    results = run_ranks(world, {**b, "max_train_step": 4, "save_every_n_steps": 0, "resume_from": "auto"},
                        tmp_path / "rb2")
    assert f"resuming from {ckpt}" in results[0]["log"]
    a, b = step_losses(tmp_path / "A"), step_losses(tmp_path / "B")
    assert len(a) == 4 and b == a


# ---------------------------------------------------------------------------------------------
# Two FSDP2 ranks: rank 0's host memory while the optimizer state is saved, measured; the state restored exactly
# ---------------------------------------------------------------------------------------------
MEASURE = r"""
import ctypes, datetime, json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
from shardtune.model_checkpointing import optimizer_state

def kib(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])

def peak_added(fn):
    dist.barrier()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory training freed goes back: the peak is of what fn holds
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    before = kib("VmRSS")
    fn()
    dist.barrier()
    return (kib("VmHWM") - before) * 1024

torch.set_num_threads(1)
mode, out, timeout = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
rank = dist.get_rank()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                  num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)  # 37M parameters
lm = LlamaForCausalLM(cfg)
for layer in lm.model.layers:
    fully_shard(layer)
fully_shard(lm)
optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3)
ids = torch.randint(0, cfg.vocab_size, (1, 16))
lm(input_ids=ids, labels=ids).loss.backward()
optimizer.step()
optimizer.zero_grad(set_to_none=True)
result = {"state_bytes": sum(p.numel() for p in lm.parameters()) * 8}  # AdamW's two fp32 moments
if rank == 0:
    out.mkdir()
if mode == "streaming":
    result["save_added"] = peak_added(lambda: optimizer_state.save(lm, optimizer, out if rank == 0 else None,
                                                                   max_shard_size="16MB"))
    fresh = torch.optim.AdamW(lm.parameters(), lr=0.5)  # no state, another lr: all of it must come from the files
    # what loading adds beyond the state this rank keeps (its shards of the moments)
    result["load_added"] = peak_added(lambda: optimizer_state.load(lm, fresh, out, torch.device("cpu"))) - \
        sum(p.to_local().numel() for p in lm.parameters()) * 8
    same = [torch.equal(fresh.state[p][k].to_local(), v.to_local()) if hasattr(v, "to_local") else
            torch.equal(fresh.state[p][k], v) for p in lm.parameters() for k, v in optimizer.state[p].items()]
    result["restored_equal"] = len(same) == 3 * len(list(lm.parameters())) and all(same)
    result["lr"] = fresh.param_groups[0]["lr"]
    result["betas_type"] = type(fresh.param_groups[0]["betas"]).__name__
else:  # what a FULL_STATE_DICT checkpoint did before: the whole state gathered on rank 0, torch.save'd
    def old():
        osd = get_optimizer_state_dict(lm, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(osd, out / "optimizer.pt")
    result["save_added"] = peak_added(old)
Path(str(out) + f".rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
"""


def _two_ranks(mode: str, out: Path) -> dict:
    port = free_port()
    # A fixed mmap threshold: glibc's sliding one (raised by the buffers training freed) would serve the tensors
    # gathered here from a heap that keeps freed pieces resident, and the peak would count the allocator's
    # fragmentation instead of what the save holds.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    procs = [subprocess.Popen([sys.executable, "-c", MEASURE, mode, str(out), str(HANG_TIMEOUT_S)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=HANG_TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return json.loads(Path(str(out) + ".rank0.json").read_text())


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_rank0_adds_a_fraction_of_the_optimizer_state_to_host_memory_where_the_old_path_added_all_of_it(tmp_path):
    streamed = _two_ranks("streaming", tmp_path / "streamed")
    whole = _two_ranks("whole", tmp_path / "whole")
    size = streamed["state_bytes"]  # 300 MB of fp32 moments
    print(f"rank 0 peak RSS added while saving the optimizer state: streaming {streamed['save_added'] / 1e6:.0f} MB"
          f" (loading {streamed['load_added'] / 1e6:.0f} MB), whole state {whole['save_added'] / 1e6:.0f} MB, for "
          f"{size / 1e6:.0f} MB of state")
    assert streamed["save_added"] < 0.35 * size and streamed["load_added"] < 0.35 * size
    assert whole["save_added"] > 0.9 * size  # the measurement sees what it must: the old path fails the bound
    assert streamed["restored_equal"] and streamed["lr"] == 1e-3 and streamed["betas_type"] == "tuple"

    folder = tmp_path / "streamed"
    index = json.loads((folder / "optimizer.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("optimizer-*.safetensors"))
    assert len(shards) > 5 and set(index["weight_map"].values()) == set(shards)
    assert len(index["weight_map"]) == 2 * (4 * 9 + 3)  # two moments of every weight, each in one shard
    with safe_open(str(folder / shards[0]), framework="pt") as fh:  # the gathered moments, not a rank's shards
        key = next(iter(fh.keys()))
        assert key.endswith(".exp_avg") or key.endswith(".exp_avg_sq")
    reference = torch.load(tmp_path / "whole" / "optimizer.pt", weights_only=True)["state"]
    for shard in shards[:2]:
        with safe_open(str(folder / shard), framework="pt") as fh:
            for key in fh.keys():
                name, moment = key.rsplit(".", 1)
                assert torch.equal(fh.get_tensor(key), reference[name][moment]), key
