"""etcd's JSON gateway encodings, shared by the Twisted client and the blocking reader (pure).

Keys and values travel base64-encoded; a key prefix is a range up to ``prefix_end``.
"""

from __future__ import annotations

import base64
from typing import Optional


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Optional[str]) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` covering every key that starts with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # every key from the prefix on
    return trimmed[:-1] + bytes([trimmed[-1] + 1])
