import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNEPILOT_SHARED", REPO.parent / "shared"))


def shared_path(*parts) -> Path:
    """A file under ../shared, or skip the test with a clear message when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data {p} not found (set PRUNEPILOT_SHARED to the shared folder)")
    return p


@pytest.fixture(scope="session")
def stories():
    """(model factory, tokenizer) for the real stories260K model."""
    from prunepilot.modeling import load_model_and_tokenizer

    path = shared_path("models", "stories260K")
    _, tok = load_model_and_tokenizer(path)
    return (lambda: load_model_and_tokenizer(path)[0]), tok


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF) model and tokenizer, loaded once per test session."""
    from prunepilot.modeling import load_model_and_tokenizer

    return load_model_and_tokenizer(shared_path("models", "smollm2-135m-instruct"))


@pytest.fixture
def one_thread():
    """Tiny models are overhead-bound: one torch thread is as fast alone and far faster on a busy 2-core
    machine, where OpenMP threads spin against each other. Modules opt in with usefixtures("one_thread")."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _shared_env(monkeypatch):
    if SHARED.exists() and "PRUNEPILOT_DATA" not in os.environ:
        monkeypatch.setenv("PRUNEPILOT_DATA", str(SHARED / "data"))
