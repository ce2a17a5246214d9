"""The real launcher: `python -m torch.distributed.run --standalone --nproc_per_node 2 finetuning.py ...` in a
subprocess (CLI parsing, process-group setup and teardown as users run it).

* --low_cpu_fsdp on a 74M-parameter model: rank 0 reads the weights, rank 1 only ever holds its shard.
  Peak host RSS per rank (resource.getrusage) is logged after loading and compared here.
* HSDP with an explicit mesh, a checkpoint, then `--resume_from auto` in a second launch.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT_S
from test_fsdp_support import log_line

REPO = Path(__file__).resolve().parent.parent


def _torchrun(args, out_dir: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false", SHARDTUNE_PG_TIMEOUT_S="600")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "finetuning.py"), "--enable_fsdp", "--output_dir", str(out_dir), "--context_length", "64",
           "--num_epochs", "1", "--run_validation", "False", "--num_workers_dataloader", "0", "--precision", "fp32",
           "--save_metrics", "True", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def medium_llama_dir(tmp_path_factory) -> Path:
    """74M parameters (296 MB in fp32): big enough for the memory difference to stand out of the noise."""
    from conftest import save_llama

    return save_llama(tmp_path_factory.mktemp("medium_llama"), hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)


def test_low_cpu_fsdp_rank0_alone_reads_the_weights(medium_llama_dir, tmp_path):
    """Peak host RSS after loading: rank 0 holds the full weights (plus its shard), rank 1 only its shard, so
    rank 1 peaks lower by about the model's size. LoRA on top: PEFT works under low_cpu_fsdp."""
    model_bytes = (medium_llama_dir / "model.safetensors").stat().st_size
    out = _torchrun(["--model_name", medium_llama_dir, "--low_cpu_fsdp", "True", "--use_peft", "True",
                     "--batch_size_training", "1", "--max_train_step", "1", "--save_model", "False"], tmp_path / "out")
    rss = {int(r): float(mb) for r, mb in
           re.findall(r"\[rank (\d)\] --> low_cpu_fsdp: weights .*? peak host RSS so far (\d+) MB", out)}
    assert set(rss) == {0, 1}, out[-3000:]
    saved_mb = rss[0] - rss[1]
    report = {"model_mb": model_bytes / 2**20, "rank0_peak_rss_mb": rss[0], "rank1_peak_rss_mb": rss[1],
              "rank1_saves_mb": saved_mb}
    print("low_cpu_fsdp peak host RSS after loading:", json.dumps(report))
    assert saved_mb > 0.6 * model_bytes / 2**20, report
    assert "steps=1" in out


def test_hsdp_checkpoint_then_resume_auto(tiny_llama_dir, tmp_path):
    """CLI flags as users type them: HYBRID_SHARD with --hsdp and an explicit mesh, a sharded checkpoint at
    step 2, then a second launch with --resume_from auto that continues to step 3."""
    out_dir = tmp_path / "out"
    common = ["--model_name", tiny_llama_dir, "--batch_size_training", "2", "--save_model", "False",
              "--fsdp_config.sharding_strategy", "HYBRID_SHARD", "--fsdp_config.hsdp", "True",
              "--sharding_group_size", "2", "--replica_group_size", "1"]
    first = _torchrun(common + ["--max_train_step", "2", "--save_every_n_steps", "2"], out_dir)
    assert "(1, 2)" in log_line(first, "--> FSDP2")  # the mesh: 1 replica x a shard group of 2
    assert (out_dir / "checkpoints" / "fine-tuned" / "step_000002" / "state.json").is_file()
    _torchrun(common + ["--max_train_step", "3", "--resume_from", "auto"], out_dir)  # continues to step 3
    from shardtune.observability.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(out_dir, "train_step")]
    assert sorted(steps) == [1, 2, 3]
