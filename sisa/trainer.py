"""Deterministic training of one SISA stage, and shard predictions.

A stage starts from a state (tensors only), trains on the records of slices 0..j
in keyed order, and returns a new state. The optimizer is rebuilt from the state at
every stage, so continuing from a stored checkpoint and continuing in memory run the
very same operations: that is what makes "restore stage j-1, redo j..R-1" equal a
from-scratch run bit for bit. Training runs with one thread and deterministic
kernels (ALGORITHMS.md rule 4); dropout is re-seeded per (shard, stage, pass).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.determinism import deterministic
from core.errors import UnlearnError
from core.keys import keyed_seed
from core.records import Record

from .checkpoint import State
from .config import SisaConfig
from .models import Classifier
from .plan import pass_order, stage_pass_sizes

ADAM_SLOTS = ("step", "exp_avg", "exp_avg_sq")


class StageTrainer:
    """Trains stages of any shard with one loaded base model."""

    def __init__(self, config: SisaConfig, classifier: Classifier):
        self.config = config
        self.clf = classifier
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise UnlearnError("config device 'cuda': no CUDA GPU is visible in this process "
                                   "(on Ray, give shard actors GPUs with --actor-gpus; or train with --device cpu)")
            classifier.model.to(self.device)
        self.label_index = {label: i for i, label in enumerate(config.labels)}
        self._tokens: dict[str, list[int]] = {}

    # -- states ---------------------------------------------------------------
    def initial_state(self, shard: int) -> State:
        return {f"param.{n}": t for n, t in self.clf.initial_params(self.config.seed, shard).items()}

    def _restore(self, state: State) -> torch.optim.Optimizer:
        self.clf.load_params({k[len("param."):]: v for k, v in state.items() if k.startswith("param.")})
        opt = torch.optim.AdamW(
            [self.clf.trainable[n] for n in sorted(self.clf.trainable)],
            lr=self.config.learning_rate, weight_decay=0.0, foreach=False,
        )
        for name, p in self.clf.trainable.items():
            if f"opt.{name}.step" in state:
                opt.state[p] = {slot: state[f"opt.{name}.{slot}"].to(p.device, copy=True) for slot in ADAM_SLOTS}
        return opt

    def _capture(self, opt: torch.optim.Optimizer) -> State:
        state: State = {f"param.{n}": p.detach().to("cpu", copy=True) for n, p in self.clf.trainable.items()}
        for name, p in self.clf.trainable.items():
            for slot, value in opt.state.get(p, {}).items():
                state[f"opt.{name}.{slot}"] = value.detach().to("cpu", copy=True)
        return state

    # -- batches --------------------------------------------------------------
    def _encode(self, records: Sequence[Record]) -> None:
        todo = [r for r in records if r.id not in self._tokens]
        if todo:
            enc = self.clf.tokenizer([r.text for r in todo], truncation=True, max_length=self.config.max_length)
            for r, ids in zip(todo, enc["input_ids"]):
                self._tokens[r.id] = list(ids)

    def _batch(self, token_lists: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(t) for t in token_lists)
        pad = self.clf.tokenizer.pad_token_id
        ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for i, t in enumerate(token_lists):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, : len(t)] = 1
        return ids, mask

    def stage_steps(self, n: int) -> int:
        b = self.config.batch_size
        return sum((size + b - 1) // b for size in stage_pass_sizes(self.config.epochs_fraction, self.config.slices, n))

    # -- training -------------------------------------------------------------
    def _loss(self, batch: Sequence[Record]) -> torch.Tensor:
        """Mean cross-entropy of the labels (the LM objective overrides this)."""
        ids, mask = self._batch([self._tokens[r.id] for r in batch])
        labels = torch.tensor([self.label_index[r.label] for r in batch], device=self.device)
        logits = self.clf.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return F.cross_entropy(logits, labels)

    def train_stage(self, state: State, records: Sequence[Record], shard: int, stage: int,
                    on_step: Callable[[], None] | None = None) -> State:
        """One stage over `records` (all retained records of slices 0..stage)."""
        cfg = self.config
        by_id = {r.id: r for r in records}
        self._encode(records)
        with deterministic():
            opt = self._restore(state)
            model = self.clf.model
            model.train()
            for p_index, size in enumerate(stage_pass_sizes(cfg.epochs_fraction, cfg.slices, len(records))):
                order = pass_order(by_id, cfg.seed, stage, p_index)[:size]
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(keyed_seed(cfg.seed, "dropout", shard, stage, p_index))
                    for start in range(0, len(order), cfg.batch_size):
                        loss = self._loss([by_id[rid] for rid in order[start:start + cfg.batch_size]])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        if on_step:
                            on_step()
            model.eval()
            return self._capture(opt)

    # -- inference ------------------------------------------------------------
    def predict_proba(self, state: State, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.clf.load_params({k[len("param."):]: v for k, v in state.items() if k.startswith("param.")})
        model = self.clf.model
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                enc = self.clf.tokenizer(list(texts[start:start + batch_size]), truncation=True,
                                         max_length=self.config.max_length)
                ids, mask = self._batch(enc["input_ids"])
                logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                out.append(torch.softmax(logits, dim=-1).cpu().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, len(self.config.labels)))
