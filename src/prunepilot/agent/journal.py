"""Append-only journal of an agent run (journal.jsonl): one JournalHeader line, then one IterationRecord per
iteration. The records are what the file holds, field for field.

Lines are written by io.JsonLines (complete, fsync'ed), so a crash leaves at worst a cut last line, dropped on
reading and cut off before a resumed run appends. A run resumes by replaying the accepted iterations' `applied`
extras in order (see loop.py); each record's `mask_hash` checks that the replay produced the same masks.
A damaged line (bad JSON in the middle, a missing or wrongly typed field) is an error naming file and line.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from ..bounded_json import BoundedJsonError, loads_bounded
from ..errors import PrunepilotError
from ..io import JsonLines
from .decision import Feedback

VERSION = 2  # 2: the header fingerprint is fingerprint.model_fingerprint (all parameters)


@dataclass
class JournalHeader:
    fingerprint: str                 # fingerprint.model_fingerprint of the starting model
    data_hash: str                   # calibration + held-out token ids
    replay_key: dict                 # AgentConfig.replay_key(): settings a replay depends on
    layers: list[str]                # the prunable linears, in order
    target_sparsity: float
    baseline_ppl: float              # held-out perplexity before the run
    held_out_tokens: int
    calibration: dict                # per-domain summary of the calibration data
    grad: dict[str, float]           # gradient importance of the starting model
    time: str
    version: int = VERSION


@dataclass
class IterationRecord:
    iteration: int
    source: str                      # which controller decided (builtin, openai, builtin-fallback ...)
    decision: dict                   # Decision.to_dict()
    warnings: list[str]
    sparsity_before: float
    ppl_before: float                # held-out ppl of the last accepted state
    accepted: bool
    applied: dict[str, float]        # extras actually applied (clipped, paced, scaled); what a replay re-applies
    scale: float                     # factor on the decision's extras (pacing.plan_step: > 1 paced up)
    gain: float                      # global sparsity gain (attempted, when rolled back)
    ppl_after: float
    ppl_change: float                # ppl_after / ppl_before - 1
    label: str                       # excellent | good | no-op | poor-rolled-back | stop
    sparsity_after: float
    zeros_after: int
    stopped: bool = False            # the controller ended the run
    grad: dict[str, float] | None = None   # gradients refreshed after this step
    mask_hash: str = ""              # fingerprint.mask_fingerprint after the step (after a rollback: restored)
    seconds: float = 0.0
    controller_s: float = 0.0        # wall time of the decision (every answer asked, the fallback included)
    replies: int = 0                 # answers asked of the controller (0: the built-in policy decided directly)
    prompt_chars: int = 0            # characters of the prompts sent (all replies)
    prompt_tokens: int | None = None       # as reported by the server (all replies), None when not reported
    completion_tokens: int | None = None
    rollback_reason: str = ""        # step | total (max_total_ppl_rise), when rolled back
    pace_gain: float = 0.0           # global gain the pace asked of this step (0: pacing off)
    spread: float = 0.0              # extra given to each layer the decision did not name, to keep the pace
    spread_layers: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per part (measures.PHASES)

    @property
    def rolled_back(self) -> bool:
        return self.label == "poor-rolled-back"

    def feedback(self) -> Feedback:
        return Feedback(self.iteration, self.gain, self.ppl_before, self.ppl_after, self.ppl_change, self.label,
                        self.accepted, self.decision.get("reasoning", ""), self.source, len(self.applied),
                        dict(self.applied), self.rollback_reason)


def _to_line(record, kind: str) -> dict:
    d = {"type": kind, **asdict(record)}
    optional = (("stopped", False), ("grad", None), ("prompt_tokens", None), ("completion_tokens", None),
                ("rollback_reason", ""), ("pace_gain", 0.0), ("spread", 0.0), ("spread_layers", 0), ("phases", {}))
    for key, unset in optional:  # optional fields appear only when they say something
        if key in d and d[key] == unset:
            del d[key]
    return d


def _from_line(cls, data: dict, where: str):
    try:
        return TypeAdapter(cls).validate_python({k: v for k, v in data.items() if k != "type"})
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "record"
        raise PrunepilotError(f"{where}: damaged journal record: {name}: {first['msg']}") from None


class Journal:
    def __init__(self, path: str | Path):
        self.file = JsonLines(path, "journal")

    @property
    def path(self) -> Path:
        return self.file.path

    def exists(self) -> bool:
        return self.file.exists()

    def has_header(self) -> bool:
        """True when the first complete line is a header (a crash can cut the very first write short)."""
        if not self.exists():
            return False
        first, sep, _ = self.path.read_bytes().partition(b"\n")
        try:
            return bool(sep) and loads_bounded(first).get("type") == "header"
        except (BoundedJsonError, AttributeError):
            return False

    def drop_partial_tail(self) -> None:
        self.file.drop_partial_tail()

    def write_header(self, header: JournalHeader) -> None:
        self.file.append(_to_line(header, "header"))

    def append(self, record: IterationRecord) -> None:
        self.file.append(_to_line(record, "iteration"))

    def read(self) -> tuple[JournalHeader, list[IterationRecord]]:
        """(header, iteration records); a cut last line is dropped."""
        lines = self.file.read()
        if not lines or lines[0][1].get("type") != "header":
            raise PrunepilotError(f"journal {self.path} has no header line")
        version = lines[0][1].get("version")
        if version != VERSION:
            raise PrunepilotError(f"journal {self.path} has version {version}, expected {VERSION} (written by another "
                                  "prunepilot version: start the run afresh in another folder)")
        header = _from_line(JournalHeader, lines[0][1], f"{self.path}:{lines[0][0]}")
        records = [_from_line(IterationRecord, d, f"{self.path}:{n}") for n, d in lines[1:]
                   if d.get("type") == "iteration"]
        return header, records
