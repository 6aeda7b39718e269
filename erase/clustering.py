"""The configuration of an ERASE clustering.

Everything that influences which examples are selected lives here; its digest is
part of the model digest, so two states can only compare equal when they were
produced under the same configuration.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from core.errors import UnlearnError
from core.keys import sha256_hex

MAX_SCALE = 65536  # keeps fixed-point rows in int32 and every reduction far from int64 overflow


@dataclass(frozen=True)
class ClusteringConfig:
    shots: int = 8  # k: total in-context examples (= clusters over all groups)
    partitions: int = 1  # P: divide-and-conquer leaves per group (keyed hash of id)
    eps: float = 0.05  # quantisation grid step in embedding units
    gamma: float = 0.2  # balance: clusters below gamma * n / k move only part of the way
    iters: int = 10  # T: at most this many Lloyd iterations (stops early at an exact fixed point)
    seed: int = 0
    scale: int = 4096  # fixed-point units per embedding unit
    per_label: bool = False  # one clustering per label, so every label appears in the prompt

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> UnlearnError:
            return UnlearnError(f"config field '{name}': {why}")

        for name in ("shots", "partitions", "iters", "seed", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, f"must be an integer, got {value!r}")
        if self.shots < 1:
            raise bad("shots", f"must be >= 1, got {self.shots}")
        if self.partitions < 1:
            raise bad("partitions", f"must be >= 1, got {self.partitions}")
        if self.iters < 1:
            raise bad("iters", f"must be >= 1, got {self.iters}")
        if self.seed < 0:
            raise bad("seed", f"must be >= 0, got {self.seed}")
        if not 1 <= self.scale <= MAX_SCALE:
            raise bad("scale", f"must be in [1, {MAX_SCALE}], got {self.scale}")
        for name in ("eps", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, f"must be a finite number, got {value!r}")
        if self.eps <= 0:
            raise bad("eps", f"must be > 0, got {self.eps}")
        if round(self.eps * self.scale) < 1:
            raise bad("eps", f"{self.eps} is below one fixed-point unit (1/{self.scale})")
        if not 0.0 <= self.gamma <= 1.0:
            raise bad("gamma", f"must be in [0, 1], got {self.gamma}")
        if not isinstance(self.per_label, bool):
            raise bad("per_label", f"must be true or false, got {self.per_label!r}")

    @property
    def eps_units(self) -> int:
        """The grid step in fixed-point units: the grid is integer, so distances stay exact."""
        return round(self.eps * self.scale)

    def group_shots(self, label_set: list[str]) -> dict[str, int]:
        """Shots per group: one group "all", or k split over the sorted labels (k // L each,
        the remainder to the first labels), so the split never depends on the data."""
        if not self.per_label:
            return {"all": self.shots}
        labels = sorted(label_set)
        if not labels:
            raise UnlearnError("per_label clustering needs at least one label")
        if len(labels) > self.shots:
            raise UnlearnError(
                f"config field 'shots': {self.shots} shots cannot cover {len(labels)} labels with per_label"
            )
        base, extra = divmod(self.shots, len(labels))
        return {label: base + (1 if i < extra else 0) for i, label in enumerate(labels)}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ClusteringConfig":
        if not isinstance(d, dict):
            raise UnlearnError(f"clustering config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UnlearnError(f"clustering config has unknown fields {unknown}: written by a newer version?")
        return cls(**d)

    def digest(self) -> str:
        return sha256_hex(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")))
