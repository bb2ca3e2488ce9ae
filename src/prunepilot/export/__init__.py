"""Deployable outputs: GGUF files for llama.cpp and the runtimes built on it (see writer.export_gguf).

Importing the package stays light (the CLI imports export.cli at start-up); export_gguf and write_gguf load
torch, transformers and gguf on first use.
"""
from __future__ import annotations

__all__ = ["export_gguf", "write_gguf"]


def __getattr__(name: str):
    if name in __all__:
        from . import writer

        return getattr(writer, name)
    raise AttributeError(name)
