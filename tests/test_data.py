"""Calibration sources: spec parsing, mixtures, seeding, clear errors."""
import json

import pytest
import torch

from prunepilot.data import TextSource, calibration_blocks, load_documents, split_counts
from prunepilot.errors import PrunepilotError
from prunepilot.testing.tiny_models import CharTokenizer


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 40}) for i in range(10)))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    (tmp_path / "b.txt").write_text("first story " * 30 + "\n\n" + "second story " * 30)
    d = tmp_path / "folder"
    d.mkdir()
    (d / "x.py").write_text("def f():\n    return 1\n" * 20)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    return tmp_path


def test_spec_parsing(corpus):
    s = TextSource.parse(f"mine={corpus}/a.jsonl#2:5:0.25")
    assert (s.domain, s.start, s.end, s.weight) == ("mine", 2, 5, 0.25)
    assert s.location.endswith("a.jsonl")
    s = TextSource.parse(f"{corpus}/b.txt:3")
    assert (s.domain, s.weight) == ("b", 3.0)
    with pytest.raises(PrunepilotError, match="weight"):
        TextSource.parse(f"{corpus}/b.txt:-1")
    with pytest.raises(PrunepilotError, match="range"):
        TextSource.parse(f"{corpus}/b.txt#x:y")


def test_presets_point_at_calibration_splits(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEPILOT_DATA", str(tmp_path))
    web = TextSource.parse("web")
    assert web.location == str(tmp_path / "c4" / "c4_sample_200.jsonl") and (web.start, web.end) == (0, 150)
    assert TextSource.parse("c4").start == 150  # held-out docs for evaluation
    assert TextSource.parse("wiki").location.endswith("validation.jsonl")
    assert TextSource.parse("math:2").weight == 2.0


def test_documents_from_jsonl_txt_folder(corpus):
    assert len(load_documents(TextSource.parse(f"{corpus}/a.jsonl#2:5"))) == 3
    assert load_documents(TextSource.parse(f"{corpus}/qa.jsonl")) == ["2+2?\n4"]
    assert len(load_documents(TextSource.parse(f"{corpus}/b.txt"))) == 2
    assert "def f" in load_documents(TextSource.parse(f"{corpus}/folder"))[0]


def test_clear_errors_for_bad_sources(corpus):
    with pytest.raises(PrunepilotError, match="does not exist"):
        load_documents(TextSource.parse(f"{corpus}/missing.jsonl"))
    with pytest.raises(PrunepilotError, match="holds no text"):
        load_documents(TextSource.parse(f"{corpus}/empty.jsonl"))
    with pytest.raises(PrunepilotError, match="bad.jsonl:2: not valid JSON"):
        load_documents(TextSource.parse(f"{corpus}/bad.jsonl"))
    with pytest.raises(PrunepilotError, match="fewer than seqlen"):
        calibration_blocks(CharTokenizer(), [f"{corpus}/qa.jsonl"], 2, 64)
    with pytest.raises(PrunepilotError, match="no calibration source"):
        calibration_blocks(CharTokenizer(), [], 2, 64)


def test_split_counts_sum_exactly():
    assert split_counts([1, 1, 1, 1], 10) == [3, 3, 2, 2]
    assert split_counts([3, 1], 8) == [6, 2]
    assert sum(split_counts([0.2, 0.3, 0.5], 7)) == 7


def test_mixture_is_seeded_and_weighted(corpus):
    tok = CharTokenizer()
    srcs = [f"{corpus}/a.jsonl:3", f"{corpus}/folder:1"]
    a, summary = calibration_blocks(tok, srcs, 8, 32, seed=1)
    b, _ = calibration_blocks(tok, srcs, 8, 32, seed=1)
    c, _ = calibration_blocks(tok, srcs, 8, 32, seed=2)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert summary["a"]["samples"] == 6 and summary["folder"]["samples"] == 2
