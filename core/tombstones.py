"""What a run remembers about what it deleted: keyed hashes, never the ids themselves.

Deleting the same record or owner twice must be a harmless no-op (a replayed request,
a retried command), yet the run must not keep the deleted ids in clear. A tombstone
is HMAC(salt, kind, value) with a random per-run salt: enough to recognise a repeat,
useless for listing what was deleted (though anyone holding the store can test a
guessed id). Shared by every method (SISA, ERASE).
"""
from __future__ import annotations

import hmac
from typing import Iterable

from .records import quote


def tombstone(salt: str, kind: str, value: str) -> str:
    return hmac.new(bytes.fromhex(salt), f"{kind}\x1f{value}".encode(), "sha256").hexdigest()


class Resolver:
    """What ids and owners name, for one committed state: each request resolves in O(its
    own size x units). `held` is either every retained id -> owner (one table), or the
    per-unit indexes of a split manifest (core/units.py: built once per unit object and
    cached, so a commit that changed one shard rebuilds one shard's table, not the run's).
    A coordinator accepting thousands of requests against a large run cannot afford to
    rebuild the owner table per request, nor per commit."""

    def __init__(self, held, tombstones: Iterable[str], salt: str):
        from .units import UnitIndex

        self.units: list[UnitIndex] = [UnitIndex((rid, owner, 0) for rid, owner in held.items())] \
            if isinstance(held, dict) else list(held)
        self.tombs = set(tombstones)
        self.salt = salt

    def holds(self, rid: str) -> bool:
        return any(rid in u.held for u in self.units)

    def ids_of(self, owner: str) -> list[str]:
        """The held ids of `owner` (every unit: an ERASE owner spans partitions)."""
        return [rid for u in self.units for rid in u.by_owner.get(owner, ())]

    def owners_held(self, owners: Iterable[str]) -> set[str]:
        return {o for o in owners if any(o in u.by_owner for u in self.units)}

    def resolve(self, ids: Iterable[str] = (), owners: Iterable[str] = ()) -> tuple[set[str], list[str], list[str]]:
        """(ids to remove, requested ids/owners already deleted earlier, unknown ones quoted
        for messages)."""
        targets: set[str] = set()
        already: list[str] = []
        unknown: list[str] = []
        for kind, values in (("id", ids), ("owner", owners)):
            for v in values:
                found = ([v] if self.holds(v) else []) if kind == "id" else self.ids_of(v)
                if found:
                    targets.update(found)
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
