"""Method registry: @register("wanda") class Wanda(...). `prunepilot methods` lists it."""
from __future__ import annotations

from .errors import PrunepilotError

_METHODS: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def get_method(name: str, **options):
    _load_builtin()
    if name not in _METHODS:
        raise PrunepilotError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    try:
        return _METHODS[name](**options)
    except TypeError as e:
        raise PrunepilotError(f"bad options for method {name!r}: {e}") from None


def available() -> dict[str, type]:
    _load_builtin()
    return dict(sorted(_METHODS.items()))


def _load_builtin():
    # importing registers the built-in methods: unstructured / N:M, then structured
    from . import methods  # noqa: F401
    from .structured import methods as structured_methods  # noqa: F401
