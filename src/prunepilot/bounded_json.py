"""JSON from files a user or an attacker may have edited (journals, checkpoints): size and depth limited.

json.loads recurses in C per nesting level; a line nested 100,000 deep raised RecursionError out of it. Here a
line longer than MAX_LINE_BYTES is refused before parsing, RecursionError becomes ValueError, and the parsed
value is walked (iteratively) to refuse nesting deeper than MAX_DEPTH, which no record prunepilot writes needs.
"""
from __future__ import annotations

import json

MAX_LINE_BYTES = 64 * 1024 * 1024  # a journal record over 100K layers is a few MB
MAX_DEPTH = 32                     # records prunepilot writes nest 4 levels at most


class BoundedJsonError(ValueError):
    """The text is too long, too deep or not JSON (the message says which)."""


def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                break
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def loads_bounded(data: bytes | str, max_bytes: int = MAX_LINE_BYTES, max_depth: int = MAX_DEPTH):
    if len(data) > max_bytes:
        raise BoundedJsonError(f"{len(data)} bytes, over the limit of {max_bytes}")
    try:
        value = json.loads(data)
    except RecursionError:
        raise BoundedJsonError(f"nested deeper than {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BoundedJsonError("not valid JSON") from None
    if _depth(value) > max_depth:
        raise BoundedJsonError(f"nested deeper than {max_depth} levels")
    return value
