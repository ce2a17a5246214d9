"""Shared fixtures: real tiny models and tokenizers written to disk, real data files.

* ``tiny_llama_dir``: a 2-layer Llama (hidden 64, GQA) with the bundled byte-level BPE tokenizer,
  saved with save_pretrained (random weights, seed 0). Session-scoped: built once.
* ``tiny_gpt2_dir``: a second architecture (GPT-2) with the same tokenizer.
* ``data_root``: a folder holding alpaca/, samsum/ and grammar/ in each data set's real format. Every test
  that takes it runs twice: on the small synthetic files in tests/fixtures (always), and on the full real
  data sets in ../shared/data when that folder exists (CI); without it the second run is skipped.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
FIXTURE_DATA = REPO / "tests" / "fixtures"  # written by tests/fixtures/make_fixtures.py
SHARED_DATA = REPO.parent / "shared" / "data"
# Subprocesses and forked ranks get this long before they are killed: only a hung run should ever reach it
# (a busy 2-core machine can make a 40 s run take several minutes), so no test depends on wall time.
HANG_TIMEOUT_S = 1800


def pytest_configure(config):
    # One core per pytest-xdist worker (-n 2 on CI's 2 cores: one thread each): torch's intra-op threads spin while
    # they wait for each other, so two workers of two threads each ran 3.3x slower than two of one thread (two
    # 30-step demo runs side by side: 347 s against 104 s, 2026-12-04). Set here, in the process that starts the
    # workers and before any test module imports torch; workers and the runs' subprocesses inherit it.
    workers = getattr(config.option, "numprocesses", None) or 1
    cores = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers if isinstance(workers, int) else 1)))
    config.addinivalue_line("markers", "slow: multi-process or real-model tests (still run in CI)")


@pytest.fixture(scope="session", params=["fixtures", "real"])
def data_root(request) -> Path:
    if request.param == "fixtures":
        return FIXTURE_DATA
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no real data sets at {SHARED_DATA}; the same checks ran on tests/fixtures")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bundled_tokenizer_dir() -> Path:
    from shardtune.configs.paths import BUNDLED_MODEL_DIR

    return BUNDLED_MODEL_DIR


def _save_tokenizer(dst: Path) -> None:
    from shardtune.configs.paths import BUNDLED_MODEL_DIR

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (BUNDLED_MODEL_DIR / name).exists():
            shutil.copy(BUNDLED_MODEL_DIR / name, dst / name)


def save_llama(d: Path, **shape) -> Path:
    """A seeded random Llama with the bundled tokenizer, saved to ``d`` (``shape`` overrides the tiny one)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shardtune.configs.paths import BUNDLED_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    dims = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), **shape}
    cfg = LlamaConfig(**dims, vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    _save_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from shardtune.configs.paths import BUNDLED_MODEL_DIR

    d = tmp_path_factory.mktemp("tiny_gpt2")
    tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=1024,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    _save_tokenizer(d)
    return d


@pytest.fixture()
def free_port() -> int:
    from test_fsdp_support import free_port as pick_port

    return pick_port()
