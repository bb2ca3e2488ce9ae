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
    with pytest.raises(PrunepilotError, match="holds no task results and no perplexity"):
        build_comparison([write(tmp_path / "empty.json", {"model": "m", "results": None})], tmp_path)
    ok = write(tmp_path / "null.json", {"model": "m", "results": None,  # null sections read as empty
                                        "perplexity": {"wikitext2": {"ppl": 25.0}}})
    assert build_comparison([ok], tmp_path / "out").exists()
    with pytest.raises(PrunepilotError, match="not a folder"):
        build_comparison([ok], ok)


def test_a_missing_main_metric_is_not_replaced_by_another(tmp_path):
    """arc_challenge is reported with acc_norm: a result holding only acc shows "-", not acc in that column."""
    assert task_score("arc_challenge", {"acc": 0.3}) is None
    a = write(tmp_path / "a.json", {"model": "m", "label": "a", "results": {"arc_challenge": {"acc": 0.3, "acc_norm": 0.4}}})
    b = write(tmp_path / "b.json", {"model": "m", "label": "b", "results": {"arc_challenge": {"acc": 0.3}}})
    text = build_comparison([a, b], tmp_path / "out").read_text()
    assert "| a | 40.00 |\n| b | - |\n" in text
    assert "zero-shot avg" not in text  # b has no score, so no task is common to both


def test_prune_report_files_and_protocol_warnings(tmp_path):
    """A `prunepilot prune` report.json compares by its perplexity_after; different protocols are flagged."""
    rep = write(tmp_path / "report.json", {"model": "m", "method": "wanda", "target_sparsity": 0.5,
                                           "perplexity_before": {"wikitext2": {"ppl": 20.0, "seqlen": 512}},
                                           "perplexity_after": {"wikitext2": {"ppl": 31.5, "seqlen": 512}}})
    proto = {"data": "/a/piqa.jsonl", "limit": None, "prompt": "p"}
    dense = write(tmp_path / "dense.json", {"model": "m", "label": "dense",
                                            "results": {"piqa": {"acc": 0.6, "n": 10, "protocol": proto}},
                                            "perplexity": {"wikitext2": {"ppl": 20.0, "seqlen": 2048}}})
    other = write(tmp_path / "other.json", {"model": "m", "label": "other", "results": {"piqa": {
        "acc": 0.5, "n": 10, "protocol": {**proto, "data": "/b/piqa.jsonl", "prompt": "q"}}}})
    text = build_comparison([dense, rep, other], tmp_path / "out").read_text()
    assert "| wanda 50% | - | 31.50 |" in text
    assert "warning: piqa was evaluated under different protocols (prompt differ)." in text  # not "data"
    assert "warning: perplexity on wikitext2 was measured with different seqlen." in text
    assert "ppl wikitext2 |" in text  # no single seqlen in the header


def test_report_command_writes_the_table_and_plot(files, tmp_path, capsys):
    from prunepilot.cli import main

    assert main(["report", *map(str, files), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "| dense | 60.00 | 30.00 | 50.00 | 27.00 | 45.00 | 29.12 |" in printed
    assert (tmp_path / "cli" / "comparison.png").stat().st_size > 0
    assert main(["report", str(files[0]), "--out", str(files[0])]) == 2  # a file is not an output folder
    assert "not a folder" in capsys.readouterr().err
