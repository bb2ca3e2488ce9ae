"""Resuming a journaled agent run: the journal must belong to this starting model, data and settings; its
accepted steps are replayed in order (the same deterministic passes), each checked against its mask hash."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..errors import PrunepilotError
from ..io import atomic_write_text
from .config import AgentConfig
from .journal import IterationRecord, Journal, JournalHeader
from .measures import Measures

log = logging.getLogger(__name__)


def data_hash(calib: torch.Tensor, held: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (calib, held):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resumable_journal(journal: Journal, cfg: AgentConfig, fingerprint: str, data: str, names: list[str],
                      settings: Path) -> tuple[JournalHeader, list[IterationRecord]]:
    """The header and records of a journaled run, checked to belong to this starting model (`fingerprint`), data
    (`data` = data_hash) and prunable linears; the saved `settings` (agent.yaml) become cfg's. torchrun: rank 0
    reads, every rank gets its reading (other nodes need not see the folder)."""
    if distributed.is_main():
        journal.drop_partial_tail()
    header, records = distributed.broadcast(journal.read() if distributed.is_main() else None)
    check_header(header, cfg, fingerprint, data, names, journal.path)
    if distributed.is_main():  # a refused resume leaves the saved settings alone
        warn_changed_settings(settings, cfg)
        atomic_write_text(settings, cfg.to_yaml())
    return header, records


def replay(measure: Measures, records: list[IterationRecord], grad: dict[str, float],
           path: Path) -> tuple[dict[str, float] | None, dict[str, float], int]:
    """Re-apply the accepted steps of `records` (journal `path`) to the model, checking each one's masks; the
    profile s after the last one (None if none) and the gradient state (gradients, accepted steps since they were
    measured) the uninterrupted run had, starting from the header's `grad`."""
    s, since_grad = None, 0
    for rec in tqdm(records, desc="replaying journal", leave=False):
        if rec.accepted:  # even a step that applied nothing refreshed the profile
            s = measure.profile(rec.applied, desc="replay")
            if measure.masks() != rec.mask_hash:
                raise PrunepilotError(f"replaying {path} iteration {rec.iteration} gave different "
                                      "masks: the starting model, the data or the environment changed")
        grad = rec.grad if rec.grad is not None else grad
        since_grad = 0 if rec.grad is not None else since_grad + int(rec.accepted)
    return s, grad, since_grad


def warn_changed_settings(saved_path: Path, cfg: AgentConfig) -> None:
    """Settings outside the replay key may change on resume (e.g. a higher target), but then the run is no
    longer the one an uninterrupted run would have made: say so."""
    if not saved_path.is_file():
        return
    old = AgentConfig.from_yaml(saved_path).model_dump(mode="json")
    new = cfg.model_dump(mode="json")

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    old_f = dict(flat(old))
    changed = [f"{k}: {old_f.get(k)!r} -> {v!r}" for k, v in flat(new) if old_f.get(k) != v]
    if changed:
        log.warning("resuming with changed settings (%s); the result differs from an uninterrupted run with the "
                    "saved ones", "; ".join(changed))


def check_header(header: JournalHeader, cfg: AgentConfig, fingerprint: str, data_hash: str, names: list[str],
                  path) -> None:
    if header.fingerprint != fingerprint:
        raise PrunepilotError(f"{path} was written for a different starting model (weights fingerprint "
                              f"{header.fingerprint} != {fingerprint}); resume from the original model")
    if header.layers != names:
        raise PrunepilotError(f"{path} lists other prunable layers than this model / include / ignore")
    if header.replay_key != cfg.replay_key():
        diff = [k for k, v in cfg.replay_key().items() if header.replay_key.get(k) != v]
        raise PrunepilotError(f"cannot resume {path}: settings changed since it was written: {', '.join(diff)}")
    if header.data_hash != data_hash:
        raise PrunepilotError(f"cannot resume {path}: the calibration / held-out data changed")
