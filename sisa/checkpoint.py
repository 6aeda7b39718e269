"""A shard's training state as safetensors bytes, and its digest.

A state is a flat dict of tensors: `param.<name>` for every trainable tensor
(LoRA matrices and the classification head) and `opt.<name>.<slot>` for the Adam
moments and step. Together they are everything needed to continue training
(ALGORITHMS.md rule 3); the frozen base model is not part of it.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported where a tensor is touched, not here: a command that only reads the
# store or asks a warm cluster (status, delete against `unlearn up`) should not pay the
# seconds torch takes to import
State = dict[str, "torch.Tensor"]


def state_digest(state: State) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in sorted name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dump_state(state: State, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return st_save(tensors, metadata={k: str(v) for k, v in metadata.items()})


def load_state(data: bytes) -> State:
    from safetensors.torch import load as st_load

    return dict(st_load(data))
