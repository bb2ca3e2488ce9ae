"""comparison.md / comparison.png from result files: values, missing tasks, common-task average, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunepilot.compare import build_comparison, load_results, results_document, save_results, task_score
from prunepilot.errors import PrunepilotError


def write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    dense = {"model": "smollm2", "label": "dense",
             "results": {"arc_easy": {"acc": 0.6, "acc_norm": 0.55, "main": "acc", "n": 20},
                         "arc_challenge": {"acc": 0.25, "acc_norm": 0.3, "n": 20},  # no "main": TASKS says acc_norm
                         "hellaswag": {"acc": 0.4, "acc_norm": 0.5, "n": 20},
                         "mmlu": {"acc": 0.27, "n": 57}},
             "perplexity": {"wikitext2": {"ppl": 29.123, "seqlen": 2048, "tokens": 1000}}}
    pruned = {"model": "smollm2", "label": "wanda 50%",
              "results": {"arc_easy": {"acc": 0.5, "main": "acc", "n": 20},
                          "arc_challenge": {"acc": 0.2, "acc_norm": 0.2, "n": 20}}}
    return [write(tmp_path / "dense.json", dense), write(tmp_path / "pruned.json", pruned)]


def test_table_values_missing_tasks_and_average(files, tmp_path):
    out = tmp_path / "report"
    md = build_comparison(files, out)
    assert md == out / "comparison.md"
    lines = md.read_text().splitlines()
    header = next(ln for ln in lines if ln.startswith("| model"))
    assert header == ("| model | arc_easy (acc) | arc_challenge (acc_norm) | hellaswag (acc_norm) | mmlu (acc) "
                      "| zero-shot avg | ppl wikitext2 (seqlen 2048) |")
    rows = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| ") and not ln.startswith("| model")}
    # average over the zero-shot tasks both files have (arc_easy, arc_challenge): (60 + 30) / 2, (50 + 20) / 2
    assert rows["dense"] == "| dense | 60.00 | 30.00 | 50.00 | 27.00 | 45.00 | 29.12 |"
    assert rows["wanda 50%"] == "| wanda 50% | 50.00 | 20.00 | - | - | 35.00 | - |"
    assert "zero-shot avg over: arc_easy, arc_challenge." in md.read_text()
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "comparison.png"]  # no temp files left


def test_duplicate_labels_and_roundtrip(tmp_path):
    doc = results_document("m", {"piqa": {"acc": 0.7, "n": 3}}, label="same")
    a, b = save_results(tmp_path / "a.json", doc), save_results(tmp_path / "b.json", doc)
    assert load_results(a)["results"]["piqa"]["acc"] == 0.7
    text = build_comparison([a, b], tmp_path / "out").read_text()
    assert "| same (a) | 70.00 | 70.00 |" in text and "| same (b) |" in text
    assert task_score("piqa", {"acc": 0.7, "acc_norm": 0.1}) == 0.7  # piqa is reported with acc


def test_errors(tmp_path):
    with pytest.raises(PrunepilotError, match="not found"):
        build_comparison([tmp_path / "missing.json"], tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PrunepilotError, match="not valid JSON"):
        build_comparison([bad], tmp_path)
    with pytest.raises(PrunepilotError, match="'model'"):
        build_comparison([write(tmp_path / "x.json", {"results": {}})], tmp_path)
    with pytest.raises(PrunepilotError, match="no result files"):
        build_comparison([], tmp_path)
    with pytest.raises(PrunepilotError, match="'results' must map names to objects"):
        build_comparison([write(tmp_path / "flat.json", {"model": "m", "results": {"arc_easy": 0.4}})], tmp_path)
    with pytest.raises(PrunepilotError, match="'perplexity' must map"):
        build_comparison([write(tmp_path / "ppl.json", {"model": "m", "perplexity": {"wikitext2": 25.0}})], tmp_path)
    ok = write(tmp_path / "null.json", {"model": "m", "results": None})  # null sections read as empty
    assert build_comparison([ok], tmp_path / "out").exists()
    with pytest.raises(PrunepilotError, match="not a folder"):
        build_comparison([ok], ok)
