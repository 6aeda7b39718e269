"""What a SISA (or approximate) run's model still knows about some records: the pieces of
`unlearn audit` that need the shard models, usable without Ray.

The run answers as its ensemble does: the mean of its non-empty shards' distributions
(next-token distributions at a completion's positions for prompt/completion runs, label
probabilities for labelled runs, whatever the objective), the rule `generate` and
`predict --aggregate mean` use. Everything here is deterministic, so a run whose shards
are bit-identical to another's gets the same figures, to the last bit.

Attacks (each on a copy; the stored run never changes):
- relearning: every shard's model fine-tuned for a few steps on part of the forget set
  (its own objective, a fresh AdamW at the run's learning rate unless given), then scored;
- quantization: every linear layer of the shard models (the adapter and any unlearning
  update merged in first; embeddings and output heads kept) rounded to 8 or 4 bits.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from core.determinism import deterministic
from core.errors import UnlearnError
from core.keys import keyed_hash
from core.membership import Scored, fake_quantize, mean_distribution
from core.records import Record, quote

from .checkpoint import State
from .run import SisaRun
from .shard import ShardWorker

SKIP = ("lm_head", "score", "classifier", "embed", "wte", "wpe")  # heads and embeddings stay as they are


class ShardModels:
    """The non-empty shard models of a run, loaded in this process."""

    def __init__(self, run: SisaRun):
        self.run, self.config = run, run.config
        self.worker = ShardWorker(run.store, run.name, run.config)
        self.entries = [s for s in run.manifest.shards if s.records > 0]
        if not self.entries:
            raise UnlearnError(f"run {quote(run.name)}: every shard is empty; there is no model to audit")
        self.tokens = self.config.objective == "lm" and not self.config.labels
        self._index = {label: i for i, label in enumerate(self.config.labels)}

    @property
    def trainer(self):
        return self.worker.trainer

    def states(self) -> list[State]:
        return [self.worker.serving_state(e)[1] for e in self.entries]

    def held(self) -> list[Record]:
        return [r for e in self.entries for sl in e.slices for r in self.worker.load_checked_slice(sl)]

    def check_form(self, records: Sequence[Record], where: str) -> None:
        for r in records:
            if self.tokens and r.completion is None:
                raise UnlearnError(f"{where}: record {quote(r.id)} has no completion; run {quote(self.run.name)} "
                                   "learned prompt/completion records")
            if not self.tokens and (r.completion is not None or r.label not in self._index):
                raise UnlearnError(f"{where}: record {quote(r.id)}: run {quote(self.run.name)} predicts the labels "
                                   f"{list(self.config.labels)}; give id, text, label records with those labels")

    def text(self, r: Record) -> str:
        return r.text + (r.completion if self.tokens else " " + r.label)

    def target(self, r: Record) -> list[int]:
        return self.trainer.answer_tokens(r) if self.tokens else [self._index[r.label]]

    def distributions(self, state: State | None, records: Sequence[Record]) -> list[np.ndarray]:
        """Per record, log-distributions [T, V] at its answer's positions under one shard."""
        if self.tokens:
            return self.trainer.answer_distributions(state, records)
        probs = self.trainer.predict_proba(state, [r.text for r in records])
        return [np.log(np.maximum(np.asarray(row, dtype=np.float64), 1e-300))[None, :] for row in probs]

    def _scored(self, per_shard: list[list[np.ndarray]], records: Sequence[Record]) -> list[Scored]:
        return [Scored.from_logprobs(mean_distribution([d[i] for d in per_shard]), self.target(r), self.text(r))
                for i, r in enumerate(records)]

    def score(self, states: Sequence[State], records: Sequence[Record], chunk: int = 32) -> list[Scored]:
        """Each record scored under the mean of the shards' distributions."""
        out: list[Scored] = []
        for start in range(0, len(records), chunk):
            part = list(records[start:start + chunk])
            out.extend(self._scored([self.distributions(state, part) for state in states], part))
        return out

    # -- attacks -------------------------------------------------------------------
    def relearned(self, states: Sequence[State], attack: Sequence[Record], steps: int, lr: float) -> list[State]:
        """Each shard's state after `steps` fine-tuning steps on `attack` (batches of the
        run's batch size, in a keyed order; no dropout), its unlearning updates kept. A fresh
        AdamW for every run: an attacker holds the weights, not the training's Adam moments
        (which an exact run's state keeps and an approximate run's unlearned state does not)."""
        trainer = self.trainer
        out = []
        order = sorted(attack, key=lambda r: (keyed_hash(0, "relearn", r.id), r.id))
        size = min(self.config.batch_size, len(order))
        for state in states:
            trainer._encode(order)
            with deterministic():
                opt = trainer._restore({k: v for k, v in state.items() if not k.startswith("opt.")})
                for group in opt.param_groups:
                    group["lr"] = lr
                trainer.clf.model.eval()
                for step in range(steps):
                    batch = [order[(step * size + i) % len(order)] for i in range(size)]
                    opt.zero_grad(set_to_none=True)
                    trainer._loss(batch).backward()
                    opt.step()
            out.append({**{k: v for k, v in state.items() if k.startswith("delta.")}, **trainer._capture(opt)})
        return out

    def quantized_score(self, states: Sequence[State], records: Sequence[Record], bits: int) -> list[Scored]:
        """Records scored by the ensemble of the shard models with their weights rounded to
        `bits` (8: per output channel; 4: per group of 32 input columns)."""
        group = None if bits >= 8 else 32
        per_shard = []
        for state in states:
            if self.tokens:  # the adapter and any unlearning updates, merged by quantized() below
                self.trainer._load(state)
            else:
                self.trainer.clf.load_params({k[len("param."):]: v for k, v in state.items() if k.startswith("param.")})
            with quantized(self.trainer.clf.model, bits, group):
                plain = {k: v for k, v in state.items() if not k.startswith("delta.")}  # merged in already
                per_shard.append(self.distributions(None if self.tokens else plain, records))
        return self._scored(per_shard, records)


def effective_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight a linear layer applies, its LoRA adapter and unlearning update merged in."""
    from .approx.layer import DeltaLinear

    if isinstance(module, DeltaLinear):
        w, b = effective_weight(module.layer)
        return w + module.delta_weight(), b
    if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
        w, b = effective_weight(module.base_layer)
        for name in module.active_adapters:
            if name in getattr(module, "lora_A", {}):
                w = w + module.get_delta_weight(name)
        return w, b
    return module.weight, module.bias


@contextmanager
def quantized(model: torch.nn.Module, bits: int, group: int | None):
    """The model with every linear layer outside heads and embeddings replaced by a plain
    linear layer of its merged weight, rounded to `bits`; the originals are put back after."""
    from .approx.layer import DeltaLinear

    def linear_like(m):
        return isinstance(m, (torch.nn.Linear, DeltaLinear)) or (hasattr(m, "base_layer") and hasattr(m, "get_delta_weight"))

    swaps, taken = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken) or not linear_like(module):
            continue
        if any(s in name.split(".") or name.split(".")[-1].startswith(s) for s in SKIP) or "modules_to_save" in name:
            continue
        taken.append(name)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            w, b = effective_weight(module)
            q = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
            q.weight.copy_(fake_quantize(w.detach(), bits, group))
            if b is not None:
                q.bias.copy_(b.detach())
        swaps.append((parent, leaf, module, q))
    try:
        for parent, leaf, _module, q in swaps:
            setattr(parent, leaf, q)
        yield model
    finally:
        for parent, leaf, module, _q in swaps:
            setattr(parent, leaf, module)
