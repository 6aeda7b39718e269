"""The `lm` objective: each shard is a LoRA adapter on a frozen causal LM, trained with the
language-modelling loss, the way language models are fine-tuned.

Every record is a prompt and a completion, and the loss is the cross-entropy of the
completion's tokens only (the prompt is context, not something to learn):
- a labelled record is rendered with the prompt template ERASE uses: prompt
  "Text: {text}\\nLabel:", completion " {label}" (its verbalizer). Scoring a label later is
  the log-likelihood ERASE computes, though without ERASE's instruction and examples in the
  prompt, and a long text keeps its end here (ERASE keeps its first 96 tokens);
- a prompt/completion record keeps its two parts, and the completion ends with the
  end-of-sequence token, so a generation learns where to stop.

Only the hidden states of the positions that predict a completion token go through the
output layer (49k-way for SmolLM2, as costly as several transformer layers per position).
Everything else (keyed initial adapters, the optimizer rebuilt from the state at every
stage, one thread, deterministic kernels) is StageTrainer's, so exactness holds as for
classifiers: a stage's output depends only on its input state and records.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from core.causal_lm import load_causal_lm
from core.errors import UnlearnError
from core.label_scoring import verbalizer_scores
from core.prompt import PromptTemplate
from core.records import Record

from .checkpoint import State
from .config import SisaConfig
from .models import Classifier, lora_wrapped
from .trainer import StageTrainer

TEMPLATE = PromptTemplate()


def load_adapted_lm(spec: str, lora_r: int, lora_alpha: int, lora_dropout: float,
                    shared: dict | None = None) -> Classifier:
    """A frozen causal LM with LoRA adapters (peft, task type causal LM) whose trainable
    tensors are swapped per shard (the Classifier holder serves both objectives)."""
    tokenizer, base = load_causal_lm(spec, "--model", shared)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lora_wrapped(spec, tokenizer, base, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        task_type="CAUSAL_LM")


def lm_base_weights(spec: str) -> dict:
    """The frozen causal LM's parameters as numpy arrays (one copy per node in Ray)."""
    _tokenizer, base = load_causal_lm(spec, "--model")
    return {n: p.detach().numpy() for n, p in base.named_parameters()}


def prompt_and_completion(record: Record) -> tuple[str, str]:
    if record.completion is None:
        return TEMPLATE.render_query(record.text), " " + record.label
    return record.text, record.completion


class LMStageTrainer(StageTrainer):
    def __init__(self, config: SisaConfig, adapted: Classifier):
        super().__init__(config, adapted)
        tok = adapted.tokenizer
        self.eos = tok.eos_token_id
        self.verb_ids = [self._ids(" " + label) for label in config.labels]
        if any(not ids for ids in self.verb_ids) or len({tuple(v) for v in self.verb_ids}) != len(self.verb_ids):
            raise UnlearnError(f"labels {list(config.labels)}: two labels have the same tokens, or one has none")
        self._pieces: dict[str, tuple[list[int], list[int]]] = {}

    @property
    def causal(self):
        return self.clf.model.get_base_model()  # the LM with the LoRA layers injected

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.clf.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _fit(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        """Cut to max_length: the completion first keeps up to all but one position, then the
        prompt keeps its end (the part nearest the answer)."""
        n = self.config.max_length
        completion = completion[:n - 1]
        return prompt[-(n - len(completion)):], completion

    # -- training -------------------------------------------------------------
    def _piece(self, r: Record) -> tuple[list[int], list[int]]:
        prompt, completion = prompt_and_completion(r)
        c_ids = self._ids(completion) + ([self.eos] if r.completion is not None and self.eos is not None else [])
        return self._fit(self._ids(prompt, special=True), c_ids)

    def _encode(self, records: Sequence[Record]) -> None:
        """Token ids of training records, cached by id (ids are unique within a run)."""
        for r in records:
            if r.id not in self._pieces:
                self._pieces[r.id] = self._piece(r)

    def _hidden(self, sequences: Sequence[list[int]]) -> torch.Tensor:
        """Last hidden states [B, T, H] of right-padded sequences."""
        ids, mask = self._batch(sequences)
        decoder = getattr(self.causal, self.causal.base_model_prefix)
        return decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state

    def _token_logprobs(self, pieces: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """Per (prompt, continuation): the log-probability of each continuation token."""
        hidden = self._hidden([p + c for p, c in pieces])
        rows = [i for i, (p, c) in enumerate(pieces) for _ in c]
        cols = [len(p) - 1 + j for p, c in pieces for j in range(len(c))]
        logits = self.causal.get_output_embeddings()(hidden[rows, cols])
        target = torch.tensor([t for _, c in pieces for t in c], device=self.device)
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, target[:, None])[:, 0]
        return list(torch.split(lp, [len(c) for _, c in pieces]))

    def _loss(self, batch: Sequence[Record]) -> torch.Tensor:
        """Mean cross-entropy over the batch's completion tokens."""
        return -torch.cat(self._token_logprobs([self._pieces[r.id] for r in batch])).mean()

    # -- inference ------------------------------------------------------------
    def _query_ids(self, text: str) -> list[int]:
        keep = max(1, self.config.max_length - max(len(v) for v in self.verb_ids))
        return self._ids(TEMPLATE.render_query(text), special=True)[-keep:]

    def predict_proba(self, state: State, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Label probabilities: the softmax over labels of each verbalizer's summed token
        log-likelihood after the query (ERASE's scoring, core.label_scoring, without examples
        in the prompt): each query runs once, and only a verbalizer's later tokens per label."""
        L = len(self.config.labels)
        if not L:
            raise UnlearnError("this run learned prompt/completion records: it has no labels to predict "
                               "(use `unlearn generate`)")
        self._load(state)
        pad = self.clf.tokenizer.pad_token_id
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                queries = [self._query_ids(t) for t in texts[start:start + batch_size]]
                sums = verbalizer_scores(self.causal, pad, self.verb_ids, queries)
                out.append(torch.softmax(torch.from_numpy(sums), dim=-1).numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, L))

    def next_token_probs(self, state: State, sequences: Sequence[list[int]]) -> np.ndarray:
        """[n, V] next-token distributions after each token sequence (one generation step)."""
        self._load(state)
        with torch.no_grad():
            hidden = self._hidden(sequences)
            last = hidden[list(range(len(sequences))), [len(s) - 1 for s in sequences]]
            logits = self.causal.get_output_embeddings()(last)
            return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def completion_logprobs(self, state: State, records: Sequence[Record], batch_size: int = 32) -> list[np.ndarray]:
        """Per record, the log-probability of each token of its completion (its verbalizer
        for a labelled record) given its prompt: what knowledge and membership are measured on."""
        self._load(state)
        out: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                out.extend(lp.cpu().numpy() for lp in self._token_logprobs([self._piece(r) for r in chunk]))
        return out

    def answer_distributions(self, state: State | None, records: Sequence[Record],
                             batch_size: int = 16) -> list[np.ndarray]:
        """Per record, the next-token log-distributions [T, V] at the T positions of its
        completion (its verbalizer for a labelled record): what an audit scores. `state` None:
        the model as it stands (an audit's quantized copy)."""
        if state is not None:
            self._load(state)
        self.clf.model.eval()
        out: list[np.ndarray] = []
        head = self.causal.get_output_embeddings()
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                pieces = [self._piece(r) for r in records[start:start + batch_size]]
                hidden = self._hidden([p + c for p, c in pieces])
                rows = [i for i, (p, c) in enumerate(pieces) for _ in c]
                cols = [len(p) - 1 + j for p, c in pieces for j in range(len(c))]
                logp = torch.log_softmax(head(hidden[rows, cols]).float(), dim=-1).cpu().numpy()
                out.extend(np.split(logp, np.cumsum([len(c) for _, c in pieces])[:-1]))
        return out

    def answer_tokens(self, record: Record) -> list[int]:
        return self._piece(record)[1]

    def _load(self, state: State) -> None:
        self.clf.load_params({k[len("param."):]: v for k, v in state.items() if k.startswith("param.")})
        self._sync_deltas(state)
        self.clf.model.eval()

    def _restore(self, state: State):
        opt = super()._restore(state)
        self._sync_deltas(state)
        return opt

    def _sync_deltas(self, state: State) -> None:
        """An approximate run's unlearning deltas, if its state has any; else none at all.
        Always: one process may hold one base model for several runs (and tests do)."""
        from .approx.unlearn import load_deltas

        load_deltas(self.causal, self.config.approx, state)
