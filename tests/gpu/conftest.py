"""GPU-only tests (``pytest tests/gpu`` on a CUDA machine). Without CUDA every test here is skipped, with the
reason shown in pytest's summary (-rs). tests/gpu is a package so that this conftest does not shadow
tests/conftest.py. Results of each GPU run are recorded in benchmarks/README.md."""
from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/gpu); skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    import torch

    here = Path(__file__).parent
    reason = None
    if not torch.cuda.is_available():
        reason = f"no CUDA device (torch {torch.__version__}): tests/gpu runs on a GPU machine"
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
