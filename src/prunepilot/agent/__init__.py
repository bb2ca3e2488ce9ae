"""Agent-guided adaptive pruning: a controller reads a z-scored per-layer sensitivity profile and decides,
iteration by iteration, how much more to prune each linear; perplexity feedback and checkpoint rollback
keep it honest. Entry point: run_agent(model, tokenizer, AgentConfig(...), out_dir).

Names are imported lazily so that `prunepilot --help` (which imports agent.cli) does not load torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AgentConfig": "config", "ControllerConfig": "config", "PolicyConfig": "config",
    "BuiltinPolicy": "controllers", "GuardedController": "controllers", "HFController": "controllers",
    "OpenAIController": "controllers", "make_controller": "controllers",
    "Decision": "decision", "Feedback": "decision", "Observation": "decision",
    "AgentResult": "loop", "AgentRun": "loop", "run_agent": "loop",
    "Profile": "profile", "gradient_importance": "profile", "percentile": "profile",
    "prune_and_profile": "profile",
    "DecisionError": "validate", "parse_decision": "validate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
