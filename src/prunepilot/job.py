"""What a pruning pipeline receives (PruneJob) and returns (PruneReport)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .data import Calibration, calibration_split, check_token_ids
from .errors import PrunepilotError
from .engine.model_config import check_within_context, context_length
from .recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class PruneJob:
    """One prune() call: the model, the recipe with the method's defaults filled in where the user left a field
    unset, the method built from its validated options, and where the calibration data comes from."""
    model: nn.Module
    recipe: Recipe
    method: Any
    tokenizer: Any = None
    token_ids: torch.Tensor | None = None   # given calibration ids (n_samples, seqlen), else drawn from the recipe
    device: torch.device = torch.device("cpu")
    refiner: Any = None                     # e.g. methods.dsnot.DSnoT: refines each mask after method.prune
    seqlen_stated: bool = False             # the user set calibration.seqlen (a default is fitted to the model)

    @property
    def name(self) -> str:
        return self.recipe.method

    def calibration(self) -> tuple[torch.Tensor, dict, bool]:
        """(ids (n_samples, seqlen), per-domain summary, whether the ids were given rather than drawn)."""
        cal = self.calibration_data()
        return cal.ids, cal.summary, self.token_ids is not None

    def calibration_data(self, held_out_windows: int = 0, held_out_seqlen: int = 0) -> Calibration:
        """The calibration windows with each row's domain and the domain weights (data.Calibration), and with
        held_out_windows the held-out tail of every source (never a calibration window). Given token ids have no
        domains (domains [], weights {}) and no held-out part."""
        if self.token_ids is not None:
            ids = check_token_ids(self.token_ids)
            check_within_context(self.model, ids.shape[1], "calibration token ids of length")
            return Calibration(ids, torch.zeros(0, dtype=torch.long), {})
        if self.tokenizer is None:
            raise PrunepilotError(f"{self.name} needs calibration data: pass a tokenizer or calibration token ids")
        c = self.recipe.calibration
        seqlen, context = c.seqlen, context_length(self.model, default=c.seqlen)
        if seqlen > context and not self.seqlen_stated:  # a default: fit it to the model
            log.warning("calibration seqlen %d (the default) exceeds the model's context of %d tokens: using %d",
                        seqlen, context, context)
            seqlen = context
        check_within_context(self.model, seqlen, "calibration seqlen")
        if held_out_windows:
            return calibration_split(self.tokenizer, c.sources, c.n_samples, seqlen, c.seed,
                                     held_out_windows=held_out_windows, held_out_seqlen=held_out_seqlen)
        return calibration_split(self.tokenizer, c.sources, c.n_samples, seqlen, c.seed)


@dataclass
class PruneReport:
    method: str
    pattern: str
    target_sparsity: float
    block_sparsity_target: list[float]
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"shape", "numel", "zeros", "sparsity"}
    calibration: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)         # engine.Coverage.to_dict(): what was pruned, what not

    @property
    def global_sparsity(self) -> float:
        total = sum(v["numel"] for v in self.layers.values())
        zeros = sum(v["zeros"] for v in self.layers.values())
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["global_sparsity"] = self.global_sparsity
        return d
