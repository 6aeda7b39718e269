import numpy as np
import pytest

from sisa.aggregate import aggregate, vote_counts
from core.errors import UnlearnError

# 3 shards, 2 texts, 3 labels
P = np.array([
    [[0.6, 0.3, 0.1], [0.1, 0.5, 0.4]],
    [[0.2, 0.7, 0.1], [0.1, 0.45, 0.45]],
    [[0.5, 0.4, 0.1], [0.0, 0.2, 0.8]],
])


def test_vote_majority_and_mean_can_disagree():
    labels, probs = aggregate(P, "vote")
    assert labels.tolist() == [0, 1]  # text 0: two votes for label 0; text 1: 2 votes for label 1
    assert np.allclose(probs, P.mean(axis=0))
    assert aggregate(P, "mean")[0].tolist() == [1, 2]  # means: text 0 [.43,.47,.1]; text 1 [.07,.38,.55]
    assert vote_counts(P).tolist() == [[2, 1, 0], [0, 2, 1]]


def test_vote_tie_goes_to_higher_mean_probability():
    p = np.array([[[0.9, 0.1]], [[0.4, 0.6]]])  # one vote each; mean favours label 0
    assert aggregate(p, "vote")[0].tolist() == [0]
    p2 = np.array([[[0.55, 0.45]], [[0.1, 0.9]]])
    assert aggregate(p2, "vote")[0].tolist() == [1]


def test_weighted_by_shard_size():
    p = np.array([[[0.9, 0.1]], [[0.2, 0.8]]])
    assert aggregate(p, "weighted", [1, 10])[0].tolist() == [1]
    assert aggregate(p, "weighted", [10, 1])[0].tolist() == [0]


def test_errors():
    with pytest.raises(UnlearnError, match="every shard is empty"):
        aggregate(np.zeros((0, 2, 2)), "vote")
    with pytest.raises(UnlearnError, match="choose one of"):
        aggregate(P, "median")
