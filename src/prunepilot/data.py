"""Text sources for calibration and evaluation: local text / jsonl / folders, HF datasets when reachable.

A source spec is a string:  ``[DOMAIN=]LOCATION[#START:END][:WEIGHT]``

- LOCATION: a file (.txt, .jsonl, .json, .py ...), a folder (all text files under it, sorted), a preset
  name (``wiki``, ``web``, ``code``, ``math`` for calibration; ``wikitext2``, ``c4``, ``code-test``,
  ``gsm8k-test``, ``tinystories`` for evaluation — files under the data root, default ../shared/data or
  $PRUNEPILOT_DATA), or ``hf:NAME[,CONFIG][@SPLIT]`` (e.g. ``hf:wikitext,wikitext-2-raw-v1@test``) for Hugging Face ``datasets`` (needs network).
- ``#START:END`` keeps documents START..END-1 (e.g. C4 docs 0-149 for calibration, 150-199 for eval).
- ``:WEIGHT`` is the source's share of the calibration samples when several sources are mixed.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import PrunepilotError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".py", ".jsonl", ".json", ".rst", ".c", ".cpp", ".js", ".java", ".go", ".rs"}

# Calibration presets follow ../shared/README.md: never calibrate on an evaluation split.
CALIBRATION_PRESETS = {
    "wiki": "wikitext2_raw/validation.jsonl",
    "web": "c4/c4_sample_200.jsonl#0:150",
    "code": "code/codeparrot_validation.jsonl",
    "math": "gsm8k/train.jsonl",
}
EVALUATION_PRESETS = {
    "wikitext2": "wikitext2_raw/test.jsonl",
    "c4": "c4/c4_sample_200.jsonl#150:200",
    "code-test": "code/codeparrot_test.jsonl",
    "gsm8k-test": "gsm8k/test.jsonl",
    "tinystories": "tinystories/tinystories_val_head.txt",
}
PRESET_DOMAINS = {"wiki": "wiki", "web": "web", "code": "code", "math": "math"}


def data_root() -> Path:
    """Folder holding the shared data sets: $PRUNEPILOT_DATA, else ../shared/data from the cwd or repo."""
    if os.environ.get("PRUNEPILOT_DATA"):
        return Path(os.environ["PRUNEPILOT_DATA"])
    repo = Path(__file__).resolve().parents[2]  # src/prunepilot/data.py -> repository root
    for base in (Path.cwd(), repo):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"


@dataclass
class TextSource:
    location: str
    weight: float = 1.0
    domain: str | None = None
    start: int | None = None
    end: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "TextSource":
        spec = spec.strip()
        if not spec:
            raise PrunepilotError("empty data source spec")
        domain = None
        if "=" in spec.split("#")[0].split(":")[0]:
            domain, spec = spec.split("=", 1)
        weight, start, end = 1.0, None, None
        spec, _, rng = spec.partition("#")
        if rng:  # START:END[:WEIGHT]
            parts = rng.split(":")
            if len(parts) not in (2, 3):
                raise PrunepilotError(f"bad document range #{rng} in source {spec!r}; use #START:END")
            rng_weight = parts[2] if len(parts) == 3 else None
        else:
            head, sep, tail = spec.rpartition(":")
            rng_weight = None
            if sep and tail and not tail.startswith(("/", "\\")) and _is_float(tail):
                spec, rng_weight = head, tail
        try:
            if rng:
                start, end = (int(parts[0]) if parts[0] else None), (int(parts[1]) if parts[1] else None)
            if rng_weight is not None:
                weight = float(rng_weight)
        except ValueError:
            raise PrunepilotError(f"bad range or weight in source {spec!r}#{rng}") from None
        if weight <= 0:
            raise PrunepilotError(f"source weight must be > 0 in {spec!r}")
        preset = CALIBRATION_PRESETS.get(spec) or EVALUATION_PRESETS.get(spec)
        if preset is not None:
            domain = domain or PRESET_DOMAINS.get(spec, spec)
            sub = TextSource.parse(str(data_root() / preset))
            start = start if start is not None else sub.start
            end = end if end is not None else sub.end
            spec = sub.location
        return cls(spec, weight, domain or Path(spec).stem, start, end)

    def __str__(self) -> str:
        rng = f"#{'' if self.start is None else self.start}:{'' if self.end is None else self.end}" if (self.start, self.end) != (None, None) else ""
        return f"{self.domain}={self.location}{rng}:{self.weight:g}"


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _row_text(row) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        return "\n".join(v for v in row.values() if isinstance(v, str))
    return ""


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            docs = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        docs.append(_row_text(json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise PrunepilotError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            return docs
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return [_row_text(r) for r in (data if isinstance(data, list) else [data])]
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in {".txt", ".md"}:  # plain text: blank-line separated documents
        return [d for d in text.split("\n\n") if d.strip()]
    return [text]


def _read_hf(location: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise PrunepilotError(f"{location}: needs the `datasets` package (pip install datasets)") from None
    name, split = location[3:], "train"
    if "@" in name:
        name, split = name.split("@", 1)
    name, _, config = name.partition(",")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, missing dataset ...
        raise PrunepilotError(f"cannot load HF dataset {location}: {str(e).splitlines()[0]}") from None
    return [_row_text(r) for r in ds]


def load_documents(source: TextSource) -> list[str]:
    """All documents of a source (with its #START:END range applied)."""
    loc = source.location
    if loc.startswith("hf:"):
        docs = _read_hf(loc)
    else:
        path = Path(loc).expanduser()
        if not path.exists():
            raise PrunepilotError(f"data source {loc} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            docs = [d for p in files for d in _read_file(p)]
        else:
            docs = _read_file(path)
    docs = docs[source.start:source.end]
    if not any(d.strip() for d in docs):
        raise PrunepilotError(f"data source {source} holds no text")
    return docs


def tokenize_stream(tokenizer, docs: list[str], add_special_tokens: bool = False,
                    max_chars: int | None = None) -> torch.Tensor:
    """Join documents with "\\n\\n" and tokenize once. Returns (n_tokens,) long."""
    text = "\n\n".join(docs)
    if max_chars is not None:
        text = text[:max_chars]
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return torch.tensor(ids, dtype=torch.long)


def check_token_ids(ids, what: str = "calibration", dims: int = 2) -> torch.Tensor:
    """Token ids given directly instead of text: an integer tensor of shape (n_samples, seqlen) (dims=2)
    or (n_tokens,) (dims=1), with at least 2 tokens per row."""
    if not isinstance(ids, torch.Tensor):
        raise PrunepilotError(f"{what} token ids must be a torch tensor, got {type(ids).__name__}")
    shape = "(n_samples, seqlen)" if dims == 2 else "(n_tokens,)"
    if ids.dim() != dims or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise PrunepilotError(f"{what} token ids must be an integer tensor of shape {shape}, got {ids.dtype} "
                              f"{tuple(ids.shape)}")
    if ids.numel() == 0 or ids.shape[-1] < 2:
        raise PrunepilotError(f"{what} token ids {tuple(ids.shape)}: need at least one row of >= 2 tokens")
    return ids.long()


def split_counts(weights: list[float], total: int) -> list[int]:
    """Split `total` samples by weights (largest remainder: counts sum to total exactly)."""
    s = sum(weights)
    raw = [w / s * total for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class Calibration:
    """Calibration windows and, when asked for, a disjoint held-out token stream (the tail of every source)."""
    ids: torch.Tensor          # (n_samples, seqlen)
    held_out: torch.Tensor     # (n_held_tokens,); empty when no held-out part was asked for
    summary: dict              # {domain: {"samples", ["held_out_tokens",] "tokens_available", "source"}}
    domains: list[str] = field(default_factory=list)          # (n_samples,) each row's domain, in ids' order
    weights: dict[str, float] = field(default_factory=dict)   # {domain: its sources' :WEIGHT}, summing to 1


def domain_weights(sources: list[TextSource]) -> dict[str, float]:
    """{domain: share} from the sources' :WEIGHT (1 when not given), normalised to sum 1; sources naming the
    same domain add up."""
    out: dict[str, float] = {}
    for src in sources:
        out[src.domain] = out.get(src.domain, 0.0) + src.weight
    total = sum(out.values())
    return {d: w / total for d, w in out.items()}


def calibration_split(tokenizer, sources: list[TextSource | str], n_samples: int, seqlen: int, seed: int = 0,
                      held_out_windows: int = 0, held_out_seqlen: int = 0,
                      max_chars: int = 20_000_000) -> Calibration:
    """Seeded (n_samples, seqlen) token blocks drawn from a weighted mixture of sources, and a held-out stream.

    Each source's documents are joined and tokenized once; with held_out_windows > 0 the last
    (its share of held_out_windows) x held_out_seqlen tokens of every source are held out, and the source's share
    of the samples are windows at random offsets of what comes before (never of the held-out tail).
    """
    if n_samples < 1 or seqlen < 2:
        raise PrunepilotError(f"calibration needs n_samples >= 1 and seqlen >= 2 (got {n_samples}, {seqlen})")
    sources = [TextSource.parse(s) if isinstance(s, str) else s for s in sources]
    if not sources:
        raise PrunepilotError("no calibration source given")
    counts = split_counts([s.weight for s in sources], n_samples)
    held_counts = split_counts([s.weight for s in sources], held_out_windows) if held_out_windows else [0] * len(sources)
    rng = random.Random(seed)
    blocks, held, summary, domains = [], [], {}, []
    for src, count, hw in zip(sources, counts, held_counts):
        stream = tokenize_stream(tokenizer, load_documents(src), max_chars=max_chars)
        n_held = hw * held_out_seqlen
        head = stream[: stream.numel() - n_held]
        if head.numel() <= seqlen:
            held_words = f" after holding out {n_held} tokens" if held_out_windows else ""
            raise PrunepilotError(f"calibration source {src} has {head.numel()} tokens{held_words}: fewer than "
                                  f"seqlen+1 = {seqlen + 1}")
        held.append(stream[stream.numel() - n_held:])
        for _ in range(count):
            i = rng.randint(0, head.numel() - seqlen - 1)
            blocks.append(head[i:i + seqlen])
            domains.append(src.domain)
        summary[src.domain] = {"samples": count, **({"held_out_tokens": n_held} if held_out_windows else {}),
                               "tokens_available": int(stream.numel()), "source": str(src)}
    order = list(range(len(blocks)))
    rng.shuffle(order)  # mix domains across batches
    return Calibration(torch.stack([blocks[i] for i in order]), torch.cat(held), summary,
                       [domains[i] for i in order], domain_weights(sources))


def calibration_blocks(tokenizer, sources: list[TextSource | str], n_samples: int, seqlen: int,
                       seed: int = 0, max_chars: int = 20_000_000) -> tuple[torch.Tensor, dict]:
    """Seeded (n_samples, seqlen) token blocks drawn from a weighted mixture of sources (calibration_split
    without a held-out part). Returns the blocks and a summary {domain: {"samples", "tokens_available", "source"}}."""
    cal = calibration_split(tokenizer, sources, n_samples, seqlen, seed, max_chars=max_chars)
    return cal.ids, cal.summary
