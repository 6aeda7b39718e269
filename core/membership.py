"""What an audit measures, as pure functions of per-token probabilities (no model, no I/O).

A record is scored through the distributions a model gives at the positions of its
answer: a completion's tokens for a language model, its label for a classifier (one
"token" over the labels). From those:
- knowledge: exact match (every answer token is the model's most likely one, which is
  what greedy decoding would write), token accuracy, and the mean log-probability of the
  answer's tokens;
- membership inference scores, higher meaning "more likely trained on": the negative
  loss (mean token NLL; Yeom et al. 2018), the zlib ratio (the total NLL over the zlib
  size of the record's text: Carlini et al. 2021, which discounts text that is simply easy),
  and min-k% prob (the mean of the k% least likely answer tokens: Shi et al. 2024);
  each summarised as the ROC AUC of a forget set against a holdout set the model never saw.
- weight quantization as an attack: round-to-nearest, symmetric, per output channel (8
  bits) or per group of input columns (4 bits), the effect int8/int4 inference has on the
  weights (Zhang et al. 2024 found it brings back "unlearned" knowledge).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MIN_K = 0.2


@dataclass(frozen=True)
class Scored:
    """One record's answer under a model: each answer token's log-probability, and whether
    it was the most likely token there."""
    logprobs: tuple[float, ...]
    top: tuple[bool, ...]
    text: str  # what the zlib ratio compresses: the prompt and the answer

    @classmethod
    def from_logprobs(cls, logprobs: np.ndarray, target: Sequence[int], text: str) -> "Scored":
        """logprobs [T, V]: log-distributions at the answer's T positions; target: its T token
        ids. Log-probabilities, not probabilities: an unlearned answer can be far less likely
        than float32 can hold as a probability."""
        rows = np.arange(len(target))
        return cls(tuple(float(x) for x in logprobs[rows, list(target)]),
                   tuple(bool(logprobs[t].argmax() == target[t]) for t in rows), text)


def mean_distribution(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """log of the mean of several distributions given as log-probabilities (an ensemble)."""
    stack = np.stack([np.asarray(lp, dtype=np.float64) for lp in logprobs])
    return np.logaddexp.reduce(stack, axis=0) - math.log(len(logprobs))


def knowledge(scored: Sequence[Scored]) -> dict:
    if not scored:
        return {"records": 0, "exact_match": None, "token_accuracy": None, "mean_logprob": None}
    tokens = [t for s in scored for t in s.top]
    return {"records": len(scored),
            "exact_match": round(float(np.mean([all(s.top) for s in scored])), 6),
            "token_accuracy": round(float(np.mean(tokens)), 6),
            "mean_logprob": round(float(np.mean([np.mean(s.logprobs) for s in scored])), 6)}


def loss_score(s: Scored) -> float:
    return float(np.mean(s.logprobs))  # = -loss


def zlib_score(s: Scored) -> float:
    return float(np.sum(s.logprobs)) / len(zlib.compress(s.text.encode("utf-8")))  # = -NLL / zlib bytes


def min_k_score(s: Scored, k: float = MIN_K) -> float:
    lows = sorted(s.logprobs)[:max(1, int(math.ceil(k * len(s.logprobs))))]
    return float(np.mean(lows))


SCORES = {"loss": loss_score, "zlib": zlib_score, "min_k": min_k_score}


def auc(members: Sequence[float], others: Sequence[float]) -> float | None:
    """P(a member scores above a non-member), ties counting one half (Mann-Whitney U)."""
    if not members or not others:
        return None
    a, b = np.asarray(members, dtype=float)[:, None], np.asarray(others, dtype=float)[None, :]
    return round(float(((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size)), 6)


def membership(forget: Sequence[Scored], holdout: Sequence[Scored]) -> dict:
    """AUC per score of the forget set (positives) against the holdout set."""
    return {f"{name}_auc": auc([f(s) for s in forget], [f(s) for s in holdout]) for name, f in SCORES.items()}


def fake_quantize(weight: np.ndarray | object, bits: int, group: int | None = None):
    """Round-to-nearest symmetric quantization and back (torch or numpy [out, in]): per
    output row, or per `group` consecutive input columns of a row."""
    import torch

    w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(weight)
    out_f, in_f = w.shape
    levels = 2 ** (bits - 1) - 1
    g = in_f if group is None or in_f % group else group
    blocks = w.reshape(out_f, in_f // g, g)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
    q = torch.clamp(torch.round(blocks / scale), -levels - 1, levels)
    return (q * scale).reshape(out_f, in_f).to(w.dtype)
