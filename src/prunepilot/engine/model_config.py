"""What a model's config says about the text model: its text sub-config, the longest sequence it is configured
for, and the evaluation window that follows from it."""
from __future__ import annotations

from ..errors import PrunepilotError


def text_config(config):
    """The text model's config (a multimodal config's text_config), else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(model, default: int = 2048) -> int:
    """The longest sequence the model is configured for (max_position_embeddings, n_positions ...)."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg = text_config(cfg)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def default_eval_seqlen(model, preferred: int = 2048) -> int:
    """The paper protocol's window (2048), shortened to the model's context when that is shorter."""
    return min(preferred, context_length(model))


def check_within_context(model, seqlen: int, what: str) -> None:
    """Calibration windows longer than the model's context would measure positions it was never trained on."""
    if seqlen > context_length(model, default=seqlen):
        raise PrunepilotError(f"{what} {seqlen} exceeds the model's context of {context_length(model)} tokens; "
                              f"pass a shorter --seqlen")
