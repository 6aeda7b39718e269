"""Frozen causal language models: the LM that ERASE prompts and that SISA-LM adapts.

Presets: `smollm2-135m` (SmolLM2-135M-Instruct, shipped offline) and `tiny-lm`, a fixed
random 2-layer Llama over SmolLM2's vocabulary: the real tokenizer and the real cache and
mask code paths at milliseconds per forward, for tests only (what it predicts means
nothing). Any Hugging Face causal-LM folder (or hub id, where there is internet) works too.
"""
from __future__ import annotations

import functools

from .assets import MODEL_LOADING, quiet_transformers, resolve_model, smollm2_dir
from .errors import UnlearnError

LM_PRESETS = ("smollm2-135m", "tiny-lm")
MAX_CONTEXT = 2048


def tiny_lm(tokenizer):
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(2468)
        return LlamaForCausalLM(tiny_lm_config(tokenizer))


def tiny_lm_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_CONTEXT,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                       initializer_range=0.4)  # large weights: outputs that vary with every token


def is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return not getattr(config, "is_encoder_decoder", False) and any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def load_causal_lm(spec: str, option: str = "--lm", shared: dict | None = None):
    """(tokenizer, model in eval mode) for a preset, a Hugging Face folder or a hub id.
    `shared`: the frozen weights as read-only arrays (core.shared_weights); the model is
    then built without a private copy of them."""
    with MODEL_LOADING:
        return _load_causal_lm(spec, option, shared)


def _load_causal_lm(spec: str, option: str, shared: dict | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .shared_weights import attach_shared, parameters_on_meta

    quiet_transformers()
    path = smollm2_dir() if spec == "tiny-lm" else resolve_model(spec, option, LM_PRESETS)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if spec == "tiny-lm":
            model = tiny_lm(tokenizer)
        else:
            config = AutoConfig.from_pretrained(path)
            if not is_causal(config):
                archs = ", ".join(getattr(config, "architectures", None) or ["none listed"])
                raise UnlearnError(f"{option} {spec!r}: not a causal language model (architectures: {archs})")
            if shared is not None:
                with parameters_on_meta():
                    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UnlearnError(f"{option} {spec!r}: cannot load ({str(exc).strip().splitlines()[0]})") from None
    if shared is not None and spec != "tiny-lm":
        attach_shared(model, shared, spec)
    model.eval()
    return tokenizer, model


_tokenizers: dict[str, object] = {}


def load_tokenizer(spec: str, option: str = "--model"):
    """The tokenizer of a causal LM alone (what a process that only drives generation
    needs); loaded once per process."""
    with MODEL_LOADING:
        return _load_tokenizer(spec, option)


def _load_tokenizer(spec: str, option: str):
    if spec not in _tokenizers:
        from transformers import AutoTokenizer

        quiet_transformers()
        path = smollm2_dir() if spec == "tiny-lm" else resolve_model(spec, option, LM_PRESETS)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise UnlearnError(f"{option} {spec!r}: cannot load ({str(exc).strip().splitlines()[0]})") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        _tokenizers[spec] = tok
    return _tokenizers[spec]


@functools.lru_cache(maxsize=16)
def lm_positions(spec: str) -> int | None:
    """How many token positions the causal LM `spec` embeds (None if its config says not):
    a generation must end within them (learned position tables have no entry past them)."""
    if spec == "tiny-lm":
        return MAX_CONTEXT
    from transformers import AutoConfig

    path = smollm2_dir() if spec == "smollm2-135m" else resolve_model(spec, "--model", LM_PRESETS)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
