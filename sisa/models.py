"""Base models and their LoRA wrapping for sequence classification.

`--model` is a preset (`tiny`, `minilm`, `smollm2-135m`), a local Hugging Face
folder, or a hub id (only where there is internet). The frozen base weights come
from the model; everything trainable (LoRA matrices and the classification head)
is initialised here from a generator keyed by (seed, shard), so a shard's initial
state never depends on global RNG state or on how peft draws its own init.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from core.assets import MODEL_LOADING, quiet_transformers, resolve_model
from core.shared_weights import attach_shared, parameters_on_meta
from core.errors import UnlearnError
from core.keys import keyed_seed

from .checkpoint import State
from .config import MODEL_PRESETS

PRESETS = MODEL_PRESETS
HEAD_NAMES = ("classifier", "score", "classification_head", "head")
TARGETS = {  # LoRA target modules per architecture (peft's defaults are the fallback)
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
}


def _tiny_base(tokenizer, num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=num_labels,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1234)  # the tiny base model is a fixed random network
        return BertForSequenceClassification(config)


@dataclass
class Classifier:
    """A tokenizer and a LoRA-wrapped classifier whose trainable tensors can be swapped,
    so one process holds one base model and moves between shards by loading states."""

    tokenizer: object
    model: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    fan_in: dict[str, int]

    def initial_params(self, seed: int, shard: int) -> State:
        """Keyed initial trainable tensors: LoRA A ~ U(+-1/sqrt(fan_in)) (what peft's
        kaiming_uniform(a=sqrt(5)) amounts to), LoRA B = 0, head weights ~ N(0, 0.02),
        biases 0. Drawn in sorted name order from one generator keyed by (seed, shard)."""
        gen = torch.Generator().manual_seed(keyed_seed(seed, "init", shard))
        out: State = {}
        for name in sorted(self.trainable):
            p = self.trainable[name]
            if "lora_B" in name or name.endswith("bias"):
                t = torch.zeros_like(p)
            elif "lora_A" in name:
                bound = 1.0 / math.sqrt(self.fan_in[name])
                t = (torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1) * bound
            else:
                t = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02
            out[name] = t
        return out

    def load_params(self, params: State) -> None:
        missing = set(self.trainable) ^ set(params)
        if missing:
            raise UnlearnError(f"checkpoint does not match the model: tensors {sorted(missing)[:3]} differ")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(params[name])

    def current_params(self) -> State:
        return {n: p.detach().clone() for n, p in self.trainable.items()}


def _head_name(model) -> str:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise UnlearnError(f"{type(model).__name__}: cannot find the classification head (looked for {HEAD_NAMES})")


def _load_base(spec: str, num_labels: int, shared: dict | None = None):
    """(tokenizer, base classifier). With `shared` (name -> read-only numpy array), the
    model is built from its config and its parameters become views of those arrays, so
    processes on one node share one copy of the frozen weights (Ray's object store)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    path = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if spec == "tiny":
            base = _tiny_base(tokenizer, num_labels)
        elif shared is not None:
            config = AutoConfig.from_pretrained(path, num_labels=num_labels)
            with parameters_on_meta():  # no private copy of the weights is ever allocated
                base = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        else:
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UnlearnError(f"--model {spec!r}: cannot load ({str(exc).splitlines()[0]})") from None
    if shared is not None:
        attach_shared(base, shared, spec)
    return tokenizer, base


def base_weights(spec: str, num_labels: int) -> dict:
    """The frozen base model's parameters as numpy arrays, to put once into Ray's object store."""
    _tokenizer, base = _load_base(spec, num_labels)
    return {n: p.detach().numpy() for n, p in base.named_parameters()}


def load_classifier(spec: str, num_labels: int, lora_r: int, lora_alpha: int, lora_dropout: float,
                    shared: dict | None = None) -> Classifier:
    with MODEL_LOADING:
        tokenizer, base = _load_base(spec, num_labels, shared)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base.config.pad_token_id = tokenizer.pad_token_id
    return lora_wrapped(spec, tokenizer, base, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        modules_to_save=[_head_name(base)])


def lora_wrapped(spec: str, tokenizer, base, **lora) -> Classifier:
    """`base` with LoRA on the target modules of its architecture (TARGETS, else peft's
    defaults); `lora`: the rest of peft's LoraConfig. Both objectives build their models here."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = base.config.model_type
    targets = TARGETS.get(model_type) or PEFT_TARGETS.get(model_type)
    if not targets:
        raise UnlearnError(f"--model {spec!r}: no LoRA target modules known for model type {model_type!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers API
        model = get_peft_model(base, LoraConfig(target_modules=targets, **lora))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fan_in = {n: (p.shape[1] if p.dim() > 1 else p.shape[0]) for n, p in trainable.items()}
    return Classifier(tokenizer, model, trainable, fan_in)
