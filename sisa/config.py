"""The training configuration of a SISA run.

Everything that influences a shard's weights lives here, and its digest is part
of every checkpoint key: a checkpoint can only be reused by a run with the same
configuration.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction

from core.errors import UnlearnError
from core.keys import sha256_hex

MODEL_PRESETS = ("tiny", "minilm", "smollm2-135m")  # here, not in models.py: the CLI lists them without torch
LM_MODEL_PRESETS = ("smollm2-135m", "tiny-lm")  # causal LMs, for the lm objective
OBJECTIVES = ("classify", "lm")

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class SisaConfig:
    shards: int = 4
    slices: int = 4
    epochs: str = "3"  # total epochs over a shard; kept as a decimal string so it hashes exactly
    seed: int = 0
    model: str = "minilm"
    labels: tuple[str, ...] = ()
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    learning_rate: float = 3e-3
    batch_size: int = 16
    max_length: int = 64
    extra: dict = field(default_factory=dict)  # reserved for future fields; part of the digest

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        object.__setattr__(self, "epochs", str(self.epochs))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> UnlearnError:
            return UnlearnError(f"config field '{name}': {why}")

        if self.shards < 1:
            raise bad("shards", f"must be >= 1, got {self.shards}")
        if self.slices < 1:
            raise bad("slices", f"must be >= 1, got {self.slices}")
        try:
            # a decimal is bounded as a float first: Fraction("1e999999999") would build
            # a power of ten with a billion digits (a hang, not an error)
            if "/" not in self.epochs and not 0 < float(self.epochs) <= 1000:
                raise bad("epochs", f"must be in (0, 1000], got {self.epochs}")
            e = Fraction(self.epochs)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise bad("epochs", f"not a number: {self.epochs!r}") from None
        if not 0 < e <= 1000:
            raise bad("epochs", f"must be in (0, 1000], got {self.epochs}")
        if self.lora_r < 1:
            raise bad("lora_r", f"must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise bad("learning_rate", f"must be a finite number > 0, got {self.learning_rate}")
        if self.lora_alpha <= 0:
            raise bad("lora_alpha", f"must be > 0, got {self.lora_alpha}")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.max_length < 8:
            raise bad("max_length", f"must be >= 8, got {self.max_length}")
        if self.device not in DEVICES:
            raise bad("extra.device", f"must be one of {list(DEVICES)}, got {self.device!r}")
        if self.objective not in OBJECTIVES:
            raise bad("extra.objective", f"must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        presets = LM_MODEL_PRESETS if self.objective == "lm" else MODEL_PRESETS
        wrong = set(MODEL_PRESETS + LM_MODEL_PRESETS) - set(presets)
        if self.model in wrong:
            raise bad("model", f"{self.model!r} is not a model for the {self.objective} objective "
                               f"(presets: {', '.join(presets)}, or a model folder)")
        if len(self.labels) == 1 or len(set(self.labels)) != len(self.labels):
            raise bad("labels", f"need at least two distinct labels, got {list(self.labels)}")
        if "approx" in self.extra:
            self.approx  # noqa: B018 (validates)
            if self.objective != "lm" or self.shards != 1 or self.slices != 1:
                raise bad("extra.approx", "approximate unlearning is for one model: the lm objective, "
                                          f"1 shard and 1 slice (got {self.objective}, {self.shards} shards, "
                                          f"{self.slices} slices)")

    @property
    def device(self) -> str:
        """Where shard models train and answer. Kept in `extra` (so CPU runs keep their
        digests) and part of the digest: GPU kernels round differently from CPU ones, so
        a GPU run and a CPU run are different runs, each exact against itself."""
        return self.extra.get("device", "cpu")

    @property
    def objective(self) -> str:
        """What a shard learns: "classify" (a classification head on the base model) or "lm"
        (a LoRA adapter on a causal LM, trained on completions). Kept in `extra`, so that
        classifier runs keep the digests they always had."""
        return self.extra.get("objective", "classify")

    @property
    def approx(self):
        """The approximate-unlearning settings of an approximate run (`--method approx`),
        else None: deletions then retrain, exactly."""
        from .approx.config import ApproxConfig

        raw = self.extra.get("approx")
        return None if raw is None else ApproxConfig.from_json(raw)

    @property
    def epochs_fraction(self) -> Fraction:
        return Fraction(self.epochs)

    def to_json(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SisaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UnlearnError(f"config has unknown fields {unknown}: written by a newer version?")
        return cls(**{k: (tuple(v) if k == "labels" else v) for k, v in d.items()})

    def digest(self) -> str:
        return sha256_hex(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")))
