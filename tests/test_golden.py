"""Every method's result on stories260K and two tiny architectures equals the recorded golden file
(bench/golden.py): masks and kept channels / KV groups exactly (SparseGPT masks within 0.1%), logits within a
tolerance. A change that is meant to alter results re-records the file with `python bench/golden.py --write`."""
import sys
from pathlib import Path

import pytest

from conftest import REPO, shared_path

sys.path.insert(0, str(REPO / "bench"))
import golden  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "golden.pt"
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def recorded():
    return golden.read(GOLDEN)


@pytest.mark.parametrize("case", golden.cases(), ids=lambda c: c.key)
def test_matches_golden(case, recorded):
    if case.model == "stories":
        shared_path("models", "stories260K")
    assert golden.compare(case, recorded[case.key], golden.run_case(case)) == []


def test_compare_catches_a_changed_mask(recorded):
    """The comparison is not vacuous: one flipped mask entry of an exact method is reported."""
    import torch

    case = next(c for c in golden.cases() if c.key == "qwen3/wanda")
    want = recorded[case.key]
    name = next(iter(want["masks"]))
    n = torch.Size(want["shapes"][name]).numel()
    bits = golden.unpack(want["masks"][name], n)
    bits[0] = ~bits[0]
    changed = {**want, "masks": {**want["masks"], name: golden.pack(bits)}}
    assert any("mask entries differ" in p for p in golden.compare(case, want, changed))
