"""Deterministic CPU (and CUDA) kernels for code that must give the same bits every run:
SISA training and ERASE embedding alike. One thread, because a reduction split across
threads sums in an order that depends on scheduling."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

TRAIN_THREADS = 1


@contextlib.contextmanager
def deterministic(threads: int = TRAIN_THREADS) -> Iterator[None]:
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


