"""In-context classification with a frozen causal LM: the prediction side of ERASE.

ERASE never trains the LM; unlearning only changes which k examples are in the prompt.
A label is scored by the summed log-likelihood of its verbalizer's tokens after the
prompt (instruction, solved examples, query up to "Label:"), and probabilities are the
softmax over labels.

Cost is what decides ERASE against SISA (ALGORITHMS.md, holistic cost), so the shared
part of the prompt is computed once: the key/value cache of the instruction and the
examples is built once per call and copied into every batch of queries (a forward pass
appends to a DynamicCache, so one batch must never see another's keys). Each batch then
runs its queries once (right-padded after the prefix) and the verbalizers' later tokens
once per label on top of that (the padding between a short query and its verbalizer is
masked out and the position ids continue from the query's real length). `use_cache=False`
runs instruction + examples + query per query, the baseline the cache is measured against;
both paths feed the model the same token ids, so they give the same probabilities.
Only the logits that are scored go through the output layer (49k-way for SmolLM2, as
costly as several transformer layers per token). The scoring itself is
core.label_scoring's, shared with SISA-LM.

`calibrate=True` applies contextual calibration (Zhao et al., ICML 2021): the label
probabilities are divided by those the same prompt gives to content-free queries ("N/A",
"", "[MASK]") and renormalised. Tiny LMs lean hard towards one label after k examples;
this removes a constant bias, at the cost of three extra queries per call.

Token ids are assembled from separately tokenized pieces (instruction, each example,
query, verbalizer), so the verbalizer scored after a query is exactly the token sequence
that followed "Label:" in the examples.

Context budget: every example and query text is cut to `text_tokens` tokens (default 96,
on a token boundary). If the k examples still do not fit in `max_length` (default: the
model's context, at most 2048) together with a query of that budget and the longest
verbalizer, the example texts are cut further, evenly, until they do; only a prompt that
cannot fit even with one token per example text is an error.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

import core  # noqa: F401  (MKL settings before torch loads)
from core.causal_lm import LM_PRESETS as PRESETS, MAX_CONTEXT, load_causal_lm  # noqa: F401 (PRESETS: re-export)
from core.errors import UnlearnError
from core.label_scoring import prefix_cache, verbalizer_scores

from core.prompt import PromptTemplate

TEXT_TOKENS = 96
CONTENT_FREE = ("N/A", "", "[MASK]")
_SLACK = 4  # tokens a rendered query may differ from its pieces (merges at the template's edges)


class InContextClassifier:
    def __init__(self, lm: str = "smollm2-135m", labels: Sequence[str] = (), verbalizers: dict[str, str] | None = None,
                 template: PromptTemplate | None = None, max_length: int | None = None,
                 text_tokens: int = TEXT_TOKENS):
        labels = list(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
            raise UnlearnError(f"labels must be at least two distinct non-empty strings, got {labels!r}")
        verbalizers = dict(verbalizers) if verbalizers is not None else {x: " " + x for x in labels}
        missing = [x for x in labels if x not in verbalizers]
        if missing:
            raise UnlearnError(f"verbalizers: no verbalizer for label {missing[0]!r}")
        if text_tokens < 1:
            raise UnlearnError(f"text_tokens must be >= 1, got {text_tokens}")
        self.labels, self.template, self.text_tokens = labels, template or PromptTemplate(), text_tokens
        self.tokenizer, self.model = load_causal_lm(lm)
        context = int(getattr(self.model.config, "max_position_embeddings", MAX_CONTEXT) or MAX_CONTEXT)
        self.max_length = min(context, MAX_CONTEXT) if max_length is None else max_length
        if not 1 <= self.max_length <= context:
            raise UnlearnError(f"max_length must be in 1..{context} (the model's context), got {max_length}")
        self.verbalizers = [verbalizers[x] for x in labels]
        self.verb_ids = [self._ids(v) for v in self.verbalizers]
        for label, ids in zip(labels, self.verb_ids):
            if not ids:
                raise UnlearnError(f"verbalizers: label {label!r} has an empty verbalizer")
        if len({tuple(ids) for ids in self.verb_ids}) != len(labels):
            raise UnlearnError("verbalizers: two labels have the same verbalizer tokens")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.instruction_ids = self._ids(self.template.render_instruction(self.verbalizers), special=True)
        # what a query of the full text budget and its longest verbalizer need after the prefix
        self.query_reserve = (len(self._ids(self.template.render_query(""))) + text_tokens
                              + max(len(ids) for ids in self.verb_ids) + _SLACK)
        if len(self.instruction_ids) + self.query_reserve > self.max_length:
            raise UnlearnError(f"max_length {self.max_length} is too short for the instruction and one query "
                               f"({len(self.instruction_ids) + self.query_reserve} tokens)")

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _truncate(self, text: str, tokens: int) -> str:
        """The longest prefix of `text` of at most `tokens` tokens, cut on a token boundary."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= tokens:
            return text
        return text[:enc["offset_mapping"][tokens - 1][1]]

    def prefix_ids(self, examples: Sequence[tuple[str, str]]) -> list[int]:
        """Instruction + solved examples, the example texts cut to fit the context (see module doc)."""
        verb = dict(zip(self.labels, self.verbalizers))
        for n, pair in enumerate(examples):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
                raise UnlearnError(f"example {n}: expected a (text, label) pair")
            if pair[1] not in verb:
                raise UnlearnError(f"example {n}: unknown label {pair[1]!r}; labels: {', '.join(self.labels)}")
        room = self.max_length - len(self.instruction_ids) - self.query_reserve
        budget = self.text_tokens
        while True:
            parts = [self._ids(self.template.render_example(self._truncate(text, budget), verb[label]))
                     for text, label in examples]
            used = sum(len(p) for p in parts)
            if used <= room:
                return self.instruction_ids + [t for p in parts for t in p]
            if budget == 1:
                raise UnlearnError(f"{len(examples)} examples do not fit in max_length {self.max_length} "
                                   "even with one token per example text")
            budget = max(1, budget - math.ceil((used - room) / len(examples)))

    def query_ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise UnlearnError(f"queries must be strings, got {type(text).__name__}")
        return self._ids(self.template.render_query(self._truncate(text, self.text_tokens)))

    def predict_proba(self, examples: Sequence[tuple[str, str]], queries: Sequence[str],
                      use_cache: bool = True, batch_size: int = 8, calibrate: bool = False) -> np.ndarray:
        """[len(queries), len(labels)] label probabilities (float64 rows summing to 1)."""
        import torch

        if isinstance(queries, str) or len(queries) == 0:
            raise UnlearnError("no queries to predict (give a non-empty list of texts)")
        if batch_size < 1:
            raise UnlearnError(f"batch_size must be >= 1, got {batch_size}")
        prefix = self.prefix_ids(examples)
        qids = [self.query_ids(q) for q in list(queries) + (list(CONTENT_FREE) if calibrate else [])]
        longest = max(len(q) for q in qids) + max(len(v) for v in self.verb_ids)
        if len(prefix) + longest > self.max_length:  # only if a template edge merged unusually
            raise UnlearnError(f"a query does not fit: {len(prefix) + longest} tokens > max_length {self.max_length}")
        scores = np.zeros((len(qids), len(self.labels)))
        with torch.inference_mode():
            past = prefix_cache(self.model, prefix) if use_cache and prefix else None
            for start in range(0, len(qids), batch_size):
                batch = qids[start:start + batch_size]
                scores[start:start + len(batch)] = self._score(prefix, past, batch)
        if not calibrate:
            return _softmax(scores)
        n = len(queries)
        bias = _softmax(scores[n:]).mean(axis=0)  # what the prompt alone makes of each label
        return _softmax(scores[:n] - np.log(np.maximum(bias, 1e-300)))

    def _score(self, prefix: list[int], past, batch: list[list[int]]) -> np.ndarray:
        """Summed verbalizer log-likelihoods [len(batch), L] (core.label_scoring)."""
        return verbalizer_scores(self.model, self.pad_id, self.verb_ids, batch, prefix, past)


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
