"""Sentence embeddings for choosing in-context examples.

Each text is embedded ALONE (no batch, no padding), with one thread and deterministic
kernels: a record's embedding then depends on nothing but its text and the encoder, so a
from-scratch run on the retained records computes exactly the vectors a run that
deleted records still holds. Batching would make a record's vector depend on its
neighbours' lengths (padding) and on the batch shape chosen by the matrix kernels.

What parallelises without breaking that is processes: `embed(texts, workers=K)` gives
contiguous chunks to K spawned processes, each embedding its texts one by one with one
thread, exactly as this process would. A 2-layer encoder spends ~4 ms per text, so a
million records are over an hour in one process; K processes divide that by about K.

`--embedder` is `minilm` (the default), `tiny` (a fixed random 2-layer BERT for fast
tests), or any Hugging Face encoder folder; mean pooling over tokens, L2-normalised.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

import core  # noqa: F401  (MKL reproducibility settings before torch loads)
from core.errors import UnlearnError

PRESETS = ("minilm", "tiny")
CHUNK = 512  # texts per task of a worker process: small enough for a smooth progress bar
MIN_PER_WORKER = 2048  # below this a worker's start (an import of torch and the encoder) costs more than it saves
MAX_WORKERS = 256


class Embedder:
    def __init__(self, spec: str = "minilm", max_length: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        from core.assets import quiet_transformers, resolve_model

        if max_length < 8:
            raise UnlearnError(f"embedder max_length must be >= 8, got {max_length}")
        self.spec, self.max_length = spec, max_length
        quiet_transformers()
        path = resolve_model(spec, "--embedder", PRESETS)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            if spec == "tiny":
                config = BertConfig(vocab_size=self.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
                with torch.random.fork_rng():
                    torch.manual_seed(4321)  # the tiny encoder is a fixed random network
                    self.model = BertModel(config)
            else:
                self.model = AutoModel.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise UnlearnError(f"--embedder {spec!r}: cannot load ({str(exc).splitlines()[0]})") from None
        self.model.eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str], progress: bool = False, workers: int = 1) -> np.ndarray:
        """float32 [n, d], rows L2-normalised. `workers` > 1: that many processes at most
        (fewer for a small input), with bit-identical results; each loads the encoder again
        from this embedder's spec (memory: workers x the encoder)."""
        from tqdm import tqdm

        if not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
            raise UnlearnError(f"embed workers must be an integer in 1..{MAX_WORKERS}, got {workers!r}")
        workers = min(workers, len(texts) // MIN_PER_WORKER)
        with tqdm(total=len(texts), desc="embed", unit="rec", file=sys.stderr,
                  disable=None if progress else True, leave=False) as bar:
            if workers > 1:
                out = self._embed_in_processes(texts, workers, bar)
            else:
                out = self.embed_alone(texts, bar)
        if not np.isfinite(out).all():
            raise UnlearnError(f"--embedder {self.spec!r}: produced non-finite embeddings")
        return out

    def embed_alone(self, texts: Sequence[str], bar=None) -> np.ndarray:
        """Each text alone, in this process, one thread: the definition of a record's vector."""
        import torch

        from core.determinism import deterministic

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with deterministic(), torch.inference_mode():
            for i, text in enumerate(texts):
                enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state[0]  # [tokens, d]
                vec = hidden.mean(dim=0)
                norm = torch.linalg.vector_norm(vec)
                out[i] = (vec / norm if norm > 0 else vec).numpy()
                if bar is not None:
                    bar.update(1)
        return out

    def _embed_in_processes(self, texts: Sequence[str], workers: int, bar) -> np.ndarray:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # spawn, not fork: a forked copy of a process that already runs torch's (or Ray's)
        # threads can deadlock on a lock held by a thread that was not copied.
        chunks = [list(texts[i:i + CHUNK]) for i in range(0, len(texts), CHUNK)]
        parts = []
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_start_worker, initargs=(self.spec, self.max_length)) as ex:
                for part in ex.map(_embed_chunk, chunks):  # in order
                    parts.append(part)
                    bar.update(len(part))
        except BrokenProcessPool:
            raise UnlearnError(f"--embedder {self.spec!r}: an embedding worker process died (out of memory, or the "
                               f"encoder does not load there; try fewer --embed-workers)") from None
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else \
            np.zeros((0, self.dim), dtype=np.float32)


_WORKER: Embedder | None = None  # the encoder of a worker process, loaded once


def _start_worker(spec: str, max_length: int) -> None:
    global _WORKER
    _WORKER = Embedder(spec, max_length)


def _embed_chunk(texts: list[str]) -> np.ndarray:
    assert _WORKER is not None
    return _WORKER.embed_alone(texts)
