"""Stages that pass large values: each item's value is ``params.size`` bytes.

Two quick stages in a row make the runner and a worker send to each other at
once, both more than a socket buffer holds (tests/test_large_values.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any


def blobs(ctx: Any) -> Iterator[bytes]:
    size = int(ctx.params["size"])
    for i in range(int(ctx.params["n"])):
        yield i.to_bytes(4, "little") * (size // 4)


def same(value: bytes) -> bytes:
    return value


def digest_head(value: bytes) -> float:
    """The item's index (its first 4 bytes), after reading the whole value."""
    hashlib.blake2b(value).digest()
    return float(int.from_bytes(value[:4], "little"))

