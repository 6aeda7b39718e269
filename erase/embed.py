"""Sentence embeddings for choosing in-context examples.

Each text is embedded ALONE (no batch, no padding), with one thread and deterministic
kernels: a record's embedding then depends on nothing but its text and the encoder, so a
from-scratch run on the retained records computes exactly the vectors a run that
deleted records still holds. Batching would make a record's vector depend on its
neighbours' lengths (padding) and on the batch shape chosen by the matrix kernels.

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

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """float32 [n, d], rows L2-normalised."""
        import torch
        from tqdm import tqdm

        from core.determinism import deterministic

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with deterministic(), torch.inference_mode():
            for i, text in enumerate(tqdm(texts, desc="embed", unit="rec", file=sys.stderr,
                                          disable=None if progress else True, leave=False)):
                enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state[0]  # [tokens, d]
                vec = hidden.mean(dim=0)
                norm = torch.linalg.vector_norm(vec)
                out[i] = (vec / norm if norm > 0 else vec).numpy()
        if not np.isfinite(out).all():
            raise UnlearnError(f"--embedder {self.spec!r}: produced non-finite embeddings")
        return out
