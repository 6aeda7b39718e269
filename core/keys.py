"""Keyed hashing: the only source of randomness in data placement and ordering.

Every random choice in SISA (a record's shard and slice, its position inside a
training pass) is a function of (seed, purpose, identity), never of array
position. Deleting a record therefore cannot move any other record, which is the
first condition for exact unlearning (ALGORITHMS.md rule 1).
"""
from __future__ import annotations

import hashlib

_SEP = "\x1f"  # unit separator: cannot appear in validated ids or owners


def keyed_hash(seed: int, purpose: str, *parts: object) -> int:
    """A 64-bit integer determined only by the seed, the purpose and the parts."""
    text = _SEP.join([str(int(seed)), purpose, *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def keyed_uniform(seed: int, purpose: str, *parts: object) -> float:
    """A float in the open interval (0, 1), keyed like :func:`keyed_hash`."""
    return (keyed_hash(seed, purpose, *parts) + 0.5) / 2.0**64


def keyed_seed(seed: int, purpose: str, *parts: object) -> int:
    """A non-negative seed for torch generators (63 bits, fits int64)."""
    return keyed_hash(seed, purpose, *parts) >> 1


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()
