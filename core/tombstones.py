"""What a run remembers about what it deleted: keyed hashes, never the ids themselves.

Deleting the same record or owner twice must be a harmless no-op (a replayed request,
a retried command), yet the run must not keep the deleted ids in clear. A tombstone
is HMAC(salt, kind, value) with a random per-run salt: enough to recognise a repeat,
useless for listing what was deleted (though anyone holding the store can test a
guessed id). Shared by every method (SISA, ERASE).
"""
from __future__ import annotations

import hmac
from collections import defaultdict
from typing import Iterable

from .records import quote


def tombstone(salt: str, kind: str, value: str) -> str:
    return hmac.new(bytes.fromhex(salt), f"{kind}\x1f{value}".encode(), "sha256").hexdigest()


class Resolver:
    """What ids and owners name, for one committed state: built once (O(records)), then
    each request resolves in O(its own size). A coordinator accepting thousands of requests
    against a large run cannot afford to rebuild the owner table per request."""

    def __init__(self, held: dict[str, str], tombstones: Iterable[str], salt: str):
        self.held = held
        self.by_owner: dict[str, list[str]] = defaultdict(list)
        for rid, owner in held.items():
            self.by_owner[owner].append(rid)
        self.tombs = set(tombstones)
        self.salt = salt

    def resolve(self, ids: Iterable[str] = (), owners: Iterable[str] = ()) -> tuple[set[str], list[str], list[str]]:
        """(ids to remove, requested ids/owners already deleted earlier, unknown ones quoted
        for messages)."""
        targets: set[str] = set()
        already: list[str] = []
        unknown: list[str] = []
        for kind, values, table in (("id", ids, None), ("owner", owners, self.by_owner)):
            for v in values:
                if (v in self.held) if table is None else (v in table):
                    targets.update([v] if table is None else table[v])
                elif tombstone(self.salt, kind, v) in self.tombs:
                    already.append(v)
                else:
                    unknown.append(f"{kind} {quote(v)}")
        return targets, already, unknown


def resolve(held: dict[str, str], tombstones: Iterable[str], salt: str, ids: Iterable[str] = (),
            owners: Iterable[str] = ()) -> tuple[set[str], list[str], list[str]]:
    """One-off `Resolver(held, tombstones, salt).resolve(ids, owners)`. `held` maps every
    retained record id to its owner."""
    return Resolver(held, tombstones, salt).resolve(ids, owners)


def after_deletion(salt: str, tombstones: Iterable[str], targets: Iterable[str], owners: Iterable[str],
                   held_owners: set[str]) -> list[str]:
    """The tombstones once `targets` (and the named owners the run held) are deleted."""
    tombs = set(tombstones) | {tombstone(salt, "id", i) for i in targets}
    tombs |= {tombstone(salt, "owner", o) for o in owners if o in held_owners}
    return sorted(tombs)
