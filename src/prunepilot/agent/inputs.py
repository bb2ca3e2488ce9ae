"""The agent's token ids: the calibration windows its passes run on and the held-out tail its perplexity is measured
on (never used for calibration), given by the caller or drawn from the configured sources."""
from __future__ import annotations

import torch

from ..data import calibration_split, check_token_ids
from ..errors import PrunepilotError
from ..engine.model_config import check_within_context
from .config import AgentConfig


def agent_inputs(model, tokenizer, cfg: AgentConfig, calibration: torch.Tensor | None = None,
                 held_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(calibration (n, seqlen), held-out (n_tokens,), summary of the sources; {} when both were given)."""
    if calibration is not None:
        calibration = check_token_ids(calibration)
    if held_out is not None:
        held_out = check_token_ids(held_out, "held-out", dims=1)
    if calibration is not None and held_out is not None:
        return calibration, held_out, {}
    if tokenizer is None:
        raise PrunepilotError("the agent needs a tokenizer (or calibration/held-out token ids)")
    c = cfg.calibration
    check_within_context(model, c.seqlen, "calibration seqlen")
    check_within_context(model, cfg.eval_seqlen, "held-out perplexity window (eval_seqlen)")
    cal = calibration_split(tokenizer, c.sources, c.n_samples, c.seqlen, cfg.seed,
                            held_out_windows=max(1, cfg.eval_tokens // cfg.eval_seqlen),
                            held_out_seqlen=cfg.eval_seqlen)
    return cal.ids, cal.held_out, cal.summary
