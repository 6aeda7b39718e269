"""What an approximate run asks for: the method and its optimization settings."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from core.errors import UnlearnError

APPROX_METHODS = ("ga", "gd", "gd-sine")
ATTENTION = ("q_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "c_proj")


@dataclass(frozen=True)
class ApproxConfig:
    """Defaults: 20 steps at 1e-4, the usual learning rate of LoRA fine-tuning. Tried once
    on SmolLM2-135M and 64 `dataset:facts` records, 1e-3 wrecked the model whatever the
    method (GA: every answer's log-probability from about -2 to -84 per token; GD and
    GD+Sine: retained answers from -1.8 to -5.3); 1e-4 moves the forget set towards unseen
    data and leaves retained answers near where they were. Nothing else was tried.

    method: ga (gradient ascent on the forget set), gd (gradient difference: descent on
        retained records plus ascent on the forget set), gd-sine (gd with the MLP deltas
        bounded by a sine, see layer.py).
    steps: optimizer steps per deletion request.
    lr: AdamW learning rate of the unlearning deltas.
    rank, alpha: the deltas' rank r and scale alpha (the update is alpha/r times B A).
    omega: the sine's frequency (gd-sine).
    batch_size: forget records (and as many retained ones, for gd) per step.
    retain_weight: weight of the retained records' loss in gd and gd-sine."""
    method: str = "gd"
    steps: int = 20
    lr: float = 1e-4
    rank: int = 8
    alpha: int = 16
    omega: float = 100.0
    batch_size: int = 8
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> UnlearnError:
            return UnlearnError(f"approximate unlearning: {name} {why}")

        if self.method not in APPROX_METHODS:
            raise bad("method", f"must be one of {', '.join(APPROX_METHODS)}, got {self.method!r}")
        for name, lo, hi in (("steps", 1, 100_000), ("rank", 1, 256), ("alpha", 1, 4096), ("batch_size", 1, 4096)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise bad(name, f"must be an integer in {lo}..{hi}, got {value!r}")
        for name, lo, hi, zero in (("lr", 0.0, 10.0, False), ("omega", 0.0, 1e6, False),
                                   ("retain_weight", 0.0, 1e6, True)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (lo < value <= hi or (zero and value == 0))
            if not ok:
                span = f"[0, {hi:g}]" if zero else f"({lo:g}, {hi:g}]"
                raise bad(name, f"must be a number in {span}, got {value!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ApproxConfig":
        if not isinstance(d, dict):
            raise UnlearnError(f"approximate unlearning: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UnlearnError(f"approximate unlearning: unknown field {unknown[0]!r}")
        return cls(**d)
