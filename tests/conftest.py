from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = ROOT.parent / "shared"


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
