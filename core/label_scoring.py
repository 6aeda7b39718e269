"""Scoring labels with a causal LM: the summed log-likelihood of each label's verbalizer
tokens after a prompt. ERASE (examples in the prompt of a frozen LM) and SISA-LM (a LoRA
adapter on the same LM, no examples) score labels the same way, with this code.

Cost decides between them (holistic cost), so nothing runs twice: a shared prefix (ERASE's
instruction and examples) is computed once and its key/value cache copied into each batch;
each query then runs once, right-padded, and only the verbalizers' later tokens run once per
label, on top of the query's cache (the padding between a short query and its verbalizer is
masked out, and position ids continue from the query's real length). Only the logits that
are scored go through the output layer (49k-way for SmolLM2, as costly as several
transformer layers per position).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def prefix_cache(model, prefix: list[int]) -> list[tuple]:
    """Per layer (keys, values) of the prefix, batch 1; never handed to the model itself."""
    import torch

    out = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.cache.layers]


def fresh_cache(model, past: list[tuple], rows: int):
    """A new DynamicCache holding the prefix for `rows` rows (expand is a view; the cache's
    first update concatenates, so the stored prefix tensors are never written: a forward pass
    appends to a DynamicCache, so one batch must never see another's keys)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in past],
                        config=model.config)


def verbalizer_scores(model, pad_id: int, verb_ids: Sequence[list[int]], batch: Sequence[list[int]],
                      prefix: Sequence[int] = (), past: list[tuple] | None = None) -> np.ndarray:
    """Summed verbalizer log-likelihoods [len(batch), len(verb_ids)] after prefix + each query.

    `past` is `prefix_cache(model, prefix)` (the prefix is not run again) or None (the
    prefix, if any, runs with every query: the baseline the cache is measured against).
    Both feed the model the same token ids."""
    import torch

    dev = model.device  # a SISA-LM shard may run on a GPU (--device cuda): its inputs go there too
    B, L, P = len(batch), len(verb_ids), len(prefix)
    qlen = torch.tensor([len(q) for q in batch])
    Q = int(qlen.max())
    query = torch.full((B, Q), pad_id, dtype=torch.long)
    qmask = torch.zeros((B, Q), dtype=torch.long)
    for b, q in enumerate(batch):
        query[b, :len(q)] = torch.tensor(q)
        qmask[b, :len(q)] = 1
    mask = torch.cat([torch.ones((B, P), dtype=torch.long), qmask], dim=1)
    if past is not None and P:  # only the queries run; positions continue after the prefix
        ids, cache, positions = query, fresh_cache(model, past, B), torch.arange(P, P + Q)
    else:  # the whole prompt, per query
        ids = torch.cat([torch.tensor(list(prefix), dtype=torch.long).expand(B, P), query], dim=1)
        cache, positions = None, torch.arange(P + Q)
    last = qlen - 1 + (ids.shape[1] - Q)  # each row's last query token in this input
    keep, column = torch.unique(last, return_inverse=True)  # output layer only where it is scored
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.expand(B, -1).to(dev),
                cache=cache, use_cache=True, logits_to_keep=keep.to(dev))
    first = torch.log_softmax(out.logits[torch.arange(B, device=dev), column.to(dev)].float(), dim=-1)  # [B, V]
    scores = torch.stack([first[:, v[0]] for v in verb_ids], dim=1).double()  # [B, L]
    M = max(len(v) for v in verb_ids) - 1
    if M > 0:  # later verbalizer tokens: one row per (query, label) on top of the query's cache
        cache = out.cache
        cache.batch_repeat_interleave(L)
        verb = torch.full((B * L, M), pad_id, dtype=torch.long)
        vmask = torch.zeros((B * L, M), dtype=torch.long)
        for l, v in enumerate(verb_ids):
            verb[l::L, :len(v) - 1] = torch.tensor(v[:-1])
            vmask[l::L, :len(v) - 1] = 1
        mask2 = torch.cat([mask.repeat_interleave(L, dim=0), vmask], dim=1)
        pos2 = P + qlen.repeat_interleave(L)[:, None] + torch.arange(M)[None, :]
        out2 = model(input_ids=verb.to(dev), attention_mask=mask2.to(dev), position_ids=pos2.to(dev), cache=cache,
                     use_cache=True)
        logp = torch.log_softmax(out2.logits.float(), dim=-1).reshape(B, L, M, -1)
        for l, v in enumerate(verb_ids):
            for t in range(1, len(v)):
                scores[:, l] += logp[:, l, t - 1, v[t]].double()
    return scores.cpu().numpy()
