"""What a run leaves behind honours the user's umask: under umask 022 every file a run writes (model, tokenizer,
checkpoint shards, manifest, metrics, config) is 0644 and every folder 0755, so that others sharing the output
folder can read it; under umask 077 nothing is readable by others."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT_S

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_honour_the_umask(umask, file_mode, dir_mode, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, str(REPO / "finetuning.py"), "--model_name", str(tiny_llama_dir), "--output_dir", str(out),
            "--max_train_step", "2", "--save_every_n_steps", "1", "--num_epochs", "1", "--context_length", "128",
            "--num_workers_dataloader", "0", "--save_metrics"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S, cwd=tmp_path,
                          preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in out.rglob("*") if not p.is_symlink()]
    assert (out / "model" / "model.safetensors").is_file() and any(p.suffix == ".distcp" for p in written)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in written}
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (dir_mode if (out / name).is_dir() else file_mode)}
    assert not wrong, wrong
