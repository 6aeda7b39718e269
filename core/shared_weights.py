"""Frozen base weights shared by every process of a node.

A base model is put once into Ray's object store as read-only numpy arrays; each actor
builds the model's modules with parameters on the meta device (no memory) and then makes
every parameter a view of those arrays. S shard actors on a node then hold one copy of the
frozen weights between them, not S. Nothing here writes to the arrays: the weights are
frozen, only adapters train.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from .errors import UnlearnError


@contextlib.contextmanager
def parameters_on_meta():
    """Create modules with their parameters on the meta device (no memory), buffers as usual
    (some, such as rotary frequencies, are computed at construction and not saved)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def attach_shared(base: torch.nn.Module, shared: dict, spec: str) -> None:
    """Make every parameter a read-only view of the shared arrays (frozen: never written)."""
    names = {n for n, _ in base.named_parameters()}
    if names != set(shared):
        raise UnlearnError(f"--model {spec!r}: shared base weights do not match the model's parameters")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for mod_name, module in base.named_modules():
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                full = f"{mod_name}.{pname}" if mod_name else pname
                if full not in shared:  # a tied parameter, reached under another name
                    continue
                arr = shared[full]
                if tuple(arr.shape) != tuple(p.shape):
                    raise UnlearnError(f"--model {spec!r}: shared tensor {full} has shape {arr.shape}, "
                                       f"expected {tuple(p.shape)}")
                module._parameters[pname] = torch.nn.Parameter(torch.from_numpy(arr), requires_grad=False)
    if hasattr(base, "tie_weights"):  # an output layer tied to the embeddings was skipped above
        base.tie_weights()
    left = [n for n, p in base.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if left:
        raise UnlearnError(f"--model {spec!r}: shared base weights left {left[0]} unset")
