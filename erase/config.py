"""The configuration of an ERASE run.

Everything that influences which examples are selected lives here (the clustering
parameters, the encoder, the label set, the seed); its digest names the run's state.
The language model and the prompt template only shape predictions: they are stored
with the run so that `predict` needs no options, and may be overridden per call.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from core.errors import UnlearnError
from core.keys import sha256_hex

CLUSTERING_FIELDS = ("shots", "partitions", "eps", "gamma", "iters", "seed", "scale", "per_label")


@dataclass(frozen=True)
class EraseConfig:
    shots: int = 8  # k: in-context examples, one per cluster
    partitions: int = 1  # P: divide-and-conquer leaves (Ray actors)
    eps: float = 0.05  # quantisation grid step in embedding units
    gamma: float = 0.2  # balance: small clusters move only part of the way
    iters: int = 10  # T Lloyd iterations
    seed: int = 0
    scale: int = 4096  # fixed-point units per embedding unit
    per_label: bool = True  # cluster each label apart, so every label is shown in the prompt
    embedder: str = "minilm"
    embed_max_length: int = 128
    lm: str = "smollm2-135m"
    calibrate: bool = True  # contextual calibration of the label probabilities (predictions only)
    labels: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # reserved for future fields; part of the digest

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if len(self.labels) == 1 or len(set(self.labels)) != len(self.labels):
            raise UnlearnError(f"config field 'labels': need at least two distinct labels, got {list(self.labels)}")
        if self.per_label and self.labels and self.shots < len(self.labels):
            raise UnlearnError(f"config field 'shots': {self.shots} shots cannot show each of the "
                               f"{len(self.labels)} labels; raise --shots or pass --no-per-label")
        if self.embed_max_length < 8:
            raise UnlearnError(f"config field 'embed_max_length': must be >= 8, got {self.embed_max_length}")
        self.clustering()  # validates the clustering fields

    def clustering(self):
        from .clustering import ClusteringConfig

        return ClusteringConfig(**{name: getattr(self, name) for name in CLUSTERING_FIELDS})

    def to_json(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "EraseConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UnlearnError(f"config has unknown fields {unknown}: written by a newer version?")
        return cls(**{k: (tuple(v) if k == "labels" else v) for k, v in d.items()})

    def digest(self) -> str:
        return sha256_hex(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")))
