"""Greedy generation from an ensemble of shard adapters.

At every step each answering shard gives its next-token distribution for every sequence,
the ensemble's distribution is their mean (in shard order, so the same shards give the same
numbers in one process or through Ray), and the most probable token is appended. A sequence
stops at the end-of-sequence token or after `max_new_tokens`. The shards are the ensemble:
a record deleted from the run is in none of them, so no step can draw on it; a shard with a
pending deletion is left out of every step (the quarantine of `cluster/`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

MAX_NEW_TOKENS = 512


def greedy(step: Callable[[list[list[int]]], np.ndarray], prompts: Sequence[list[int]], max_new_tokens: int,
           eos: int | None) -> list[list[int]]:
    """The new tokens of each prompt. `step(sequences)` returns [n, V] probabilities."""
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    live = [i for i, s in enumerate(seqs) if s]
    for _ in range(max_new_tokens):
        if not live:
            break
        probs = step([seqs[i] for i in live])
        still = []
        for i, token in zip(live, probs.argmax(axis=1).tolist()):
            if token == eos:
                continue
            new[i].append(token)
            seqs[i].append(token)
            still.append(i)
        live = still
    return new


def mean_step(next_probs: Callable, entries: Sequence) -> Callable[[list[list[int]]], np.ndarray]:
    """A step that asks every entry's shard (`next_probs(entries, sequences)` gives
    (checkpoint key, [n, V]) per entry) and averages."""
    def step(seqs: list[list[int]]) -> np.ndarray:
        answers = next_probs(entries, seqs)
        return np.stack([p for _, p in answers]).mean(axis=0)

    return step


def generate_answers(config, prompts: Sequence[str], entries: Sequence, next_probs: Callable,
                     max_new_tokens: int) -> dict:
    """The ensemble of `entries` continues each prompt; the answer names the shards used."""
    from core.causal_lm import load_tokenizer, lm_positions
    from core.errors import UnlearnError

    if config.objective != "lm":
        raise UnlearnError("this run's shards are classifiers (objective classify): only runs trained with "
                           "--objective lm generate text")
    if not entries:
        raise UnlearnError("no shard holds records: nothing can generate")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UnlearnError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
    tok = load_tokenizer(config.model)
    keep = config.max_length - 1
    positions = lm_positions(config.model)
    if positions is not None:  # the prompt's end and every new token within the model's positions
        if max_new_tokens >= positions:
            raise UnlearnError(f"max_new_tokens {max_new_tokens}: the model embeds {positions} positions in all")
        keep = min(keep, positions - max_new_tokens)
    ids = [list(tok(p, add_special_tokens=True)["input_ids"])[-keep:] for p in prompts]
    new = greedy(mean_step(next_probs, entries), ids, max_new_tokens, tok.eos_token_id)
    return {"shards": [e.shard for e in entries],
            "generations": [{"prompt": p, "completion": tok.decode(t, skip_special_tokens=True), "tokens": t}
                            for p, t in zip(prompts, new)]}
