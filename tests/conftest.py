from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models gain nothing from several threads, and on a loaded 2-core machine torch's thread pool
# fights other processes (10x slower tests). Subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    data = SHARED / "data"
    if not data.is_dir():
        pytest.fail(f"{data} is missing: tests expect ../shared beside the checkout")
    return data


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a small real BPE tokenizer, saved as safetensors."""
    from rlaif.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), FIXTURES)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own model cache; nothing touches ~/.cache."""
    monkeypatch.setenv("RLAIF_HOME", str(tmp_path / "rlaif-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
