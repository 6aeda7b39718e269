"""Ensemble aggregation of shard predictions (pure numpy).

probs has shape [S, n, L]: S shard models, n texts, L labels. The SISA paper takes
a majority vote of labels; averaging probabilities and weighting shards by size are
the common alternatives.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from core.errors import UnlearnError

METHODS = ("vote", "mean", "weighted")


def aggregate(probs: np.ndarray, method: str = "vote", weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (label index per text [n], probabilities [n, L]).

    vote: each shard votes for its argmax; ties go to the higher mean probability,
    then to the lower label index; the probabilities returned are the mean ones.
    mean: argmax of the mean probability. weighted: mean weighted by `weights`."""
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise UnlearnError("no shard model to aggregate (every shard is empty)")
    if method not in METHODS:
        raise UnlearnError(f"--aggregate {method!r}: choose one of {', '.join(METHODS)}")
    S, n, L = probs.shape
    mean = probs.mean(axis=0)
    if method == "mean":
        return mean.argmax(axis=1), mean
    if method == "weighted":
        w = np.asarray(weights if weights is not None else np.ones(S), dtype=np.float64)
        if w.shape != (S,) or w.sum() <= 0:
            raise UnlearnError("weighted aggregation needs one positive weight per shard")
        p = np.tensordot(w / w.sum(), probs, axes=1)
        return p.argmax(axis=1), p
    # lexicographic: most votes, then highest mean probability (argmax keeps the lowest index on ties)
    score = vote_counts(probs) * 2.0 + mean  # mean <= 1 < 2 = one vote
    return score.argmax(axis=1), mean


def vote_counts(probs: np.ndarray) -> np.ndarray:
    """How many shards pick each label, [n, L]."""
    S, n, L = probs.shape
    votes = np.zeros((n, L), dtype=np.int64)
    np.add.at(votes, (np.tile(np.arange(n), S), probs.argmax(axis=2).reshape(-1)), 1)
    return votes
