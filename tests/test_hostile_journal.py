"""Tampered journal lines are one error line naming the line (a line nested 100,000 deep used to raise
RecursionError out of `agent --resume`)."""
import json

import pytest

from prunepilot.bounded_json import MAX_DEPTH, BoundedJsonError, loads_bounded
from prunepilot.cli import main
from prunepilot.errors import PrunepilotError
from prunepilot.io import JsonLines

HEADER = {"type": "header", "version": 2}


@pytest.mark.parametrize("line, why", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested deeper"),
    ('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), "nested deeper"),  # parses, still too deep
])
def test_deep_lines_are_refused_with_their_line_number(tmp_path, line, why):
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + line + "\n" + json.dumps(HEADER) + "\n")
    with pytest.raises(PrunepilotError, match=f"journal.jsonl:2: journal line is {why}"):
        JsonLines(path, "journal").read()


def test_a_deep_last_line_is_not_mistaken_for_a_cut_write(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(PrunepilotError, match="journal.jsonl:2: journal line is nested deeper"):
        JsonLines(path, "journal").read()
    path.write_text(json.dumps(HEADER) + "\n" + '{"type": "iter')  # a cut write is still skipped
    assert [n for n, _ in JsonLines(path, "journal").read()] == [1]


def test_size_limit_applies_before_parsing():
    with pytest.raises(BoundedJsonError, match="over the limit"):
        loads_bounded(b"[" * 11, max_bytes=10)
    assert loads_bounded('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}


@pytest.mark.parametrize("line", ["[" * 100_000 + "]" * 100_000, "{not json"])
def test_agent_resume_on_a_tampered_journal_is_one_line_before_loading(tmp_path, capsys, line):
    out = tmp_path / "run"
    out.mkdir()
    (out / "journal.jsonl").write_text(json.dumps(HEADER) + "\n" + line + "\n" + json.dumps(HEADER) + "\n")
    # the model does not exist: the journal is read before the model would be loaded
    assert main(["agent", str(tmp_path / "no-model"), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunepilot: error: ") and "journal.jsonl:2" in err[0]
