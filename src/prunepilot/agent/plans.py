"""The allocation that controller kind "plan" follows, computed from the dense model before the loop starts:
uniform (no pass), OWL's per-block sparsities (one statistics pass), or the evolutionary search's per-linear ones
(Wanda levels, KL to the dense model on the held-out tokens; its log in out_dir/evo_search.jsonl)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine import ModelAdapter
from ..errors import PrunepilotError
from ..evo_allocation import evo_targets
from ..methods.wanda import Wanda
from ..recipe import AllocationConfig
from ..search import EvoOptions
from ..unstructured import owl_block_sparsities
from .config import AgentConfig
from .plan_controller import PlanController, block_plan, uniform_plan


def plan_controller(model, adapter: ModelAdapter, cfg: AgentConfig, calib: torch.Tensor, held: torch.Tensor,
                    device, out_dir: Path) -> PlanController:
    """Every linear's final sparsity under cfg.controller.plan, as a controller."""
    names = list(adapter.all_linears())
    if cfg.controller.plan == "uniform":
        return PlanController(uniform_plan(names, cfg.target_sparsity), "uniform")
    if cfg.controller.plan == "evo":
        return PlanController(evo_plan(model, adapter, cfg, calib, held, device, out_dir), "evo")
    owl = owl_block_sparsities(adapter, calib, device, cfg.target_sparsity, AllocationConfig(),
                               cfg.calibration.batch_size)
    return PlanController(block_plan(names, owl), "owl")


def evo_plan(model, adapter: ModelAdapter, cfg: AgentConfig, calib: torch.Tensor, held: torch.Tensor, device,
             out_dir: Path) -> dict[str, float]:
    """The evolutionary search's allocation, scored on the held-out tail cut into the search's windows."""
    opts = EvoOptions(log=str(out_dir / "evo_search.jsonl"))
    windows = held.numel() // opts.seqlen
    if windows < 1:
        raise PrunepilotError(f"controller plan evo needs at least {opts.seqlen} held-out tokens (eval_tokens)")
    held = held[: windows * opts.seqlen].view(windows, opts.seqlen)
    plan, _ = evo_targets(model, adapter, Wanda(), calib, held, cfg.target_sparsity, opts, cfg.seed, device,
                          cfg.calibration.batch_size)
    return plan
