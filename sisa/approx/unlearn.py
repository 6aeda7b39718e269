"""Attaching unlearning deltas to a causal LM, and the GA / GD / GD+Sine loop.

The fine-tuned model (its LoRA adapter) stays as trained; unlearning trains a fresh delta
on every attention projection the adapter touches and every MLP projection, starting from
zero (B = 0), and only the deltas move. A run's state after a deletion is its adapter
(`param.*`, unchanged) plus the deltas (`delta.*`); a later deletion continues from them.

Losses are the completion tokens' mean cross-entropy (what the lm objective trains on):
- GA: maximise the forget records' loss;
- GD: minimise retain_weight x the retained records' loss minus the forget records' loss;
- GD+Sine: GD with the MLP deltas bounded (layer.py).
Everything is keyed (the initial A, the order of batches) and runs with one thread and
deterministic kernels, so one request on one state always gives the same bits; that does
not make it verifiable: nothing says what "the model without X" would be.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from core.determinism import deterministic
from core.keys import keyed_hash, keyed_seed
from core.records import Record

from .config import ATTENTION, MLP, ApproxConfig
from .layer import DeltaLinear

PREFIX = "delta."


def _targets(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every attention and MLP projection to unlearn with."""
    out = []
    for name, _module in model.named_modules():
        parent_name, _, leaf = name.rpartition(".")
        if leaf in ATTENTION + MLP:
            out.append((model.get_submodule(parent_name) if parent_name else model, leaf))
    return out


def _dims(module: torch.nn.Module) -> tuple[int, int]:
    base = getattr(module, "base_layer", module)
    return int(base.in_features), int(base.out_features)


def attached(model: torch.nn.Module) -> dict[str, DeltaLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DeltaLinear)}


def _omega(config: ApproxConfig, leaf: str) -> float | None:
    return config.omega if config.method == "gd-sine" and leaf in MLP else None


def _fits(deltas: dict[str, DeltaLinear], config: ApproxConfig) -> bool:
    """Whether attached deltas are the ones `config` builds (rank, scale, which are bounded
    and at what frequency): a process holds one base model for every run of the same model
    and LoRA settings, whatever their approximate settings."""
    return all(d.A.shape[0] == config.rank and d.scale == config.scale
               and d.omega == _omega(config, name.rpartition(".")[2]) for name, d in deltas.items())


def attach_deltas(model: torch.nn.Module, config: ApproxConfig) -> dict[str, DeltaLinear]:
    """Wrap the target projections (once per config: deltas another run's settings built
    are replaced); returns name -> delta, names as before wrapping."""
    have = attached(model)
    if have and _fits(have, config):
        return have
    detach_deltas(model)
    for parent, leaf in _targets(model):
        layer = getattr(parent, leaf)
        d_in, d_out = _dims(layer)
        setattr(parent, leaf, DeltaLinear(layer, d_in, d_out, config.rank, config.scale, _omega(config, leaf)))
    return attached(model)


def detach_deltas(model: torch.nn.Module) -> None:
    for name in list(attached(model)):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, getattr(parent, leaf).layer)


def delta_state(deltas: dict[str, DeltaLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(deltas):
        out[f"{PREFIX}{name}.A"] = deltas[name].A.detach().clone()
        out[f"{PREFIX}{name}.B"] = deltas[name].B.detach().clone()
    return out


def load_deltas(model: torch.nn.Module, config: ApproxConfig | None, state: dict) -> None:
    """Make the model's deltas those of `state`: attached and filled when it has any, else
    removed (the model is then exactly the fine-tuned one)."""
    tensors = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    if not tensors:
        detach_deltas(model)
        return
    if config is None:
        from core.errors import UnlearnError

        raise UnlearnError("checkpoint holds unlearning deltas, but the run is not approximate")
    deltas = attach_deltas(model, config)
    want = {f"{PREFIX}{n}.{x}" for n in deltas for x in "AB"}
    if want != set(tensors):
        from core.errors import UnlearnError

        raise UnlearnError(f"checkpoint does not match the model: unlearning tensors {sorted(want ^ set(tensors))[:3]} "
                           "differ")
    for name, d in deltas.items():  # copy_ would broadcast a [1, d_in] tensor into every row
        for x, p in (("A", d.A), ("B", d.B)):
            got = tuple(tensors[f"{PREFIX}{name}.{x}"].shape)
            if got != tuple(p.shape):
                from core.errors import UnlearnError

                raise UnlearnError(f"checkpoint does not match the model: unlearning tensor {PREFIX}{name}.{x} has "
                                   f"shape {list(got)}, the run's settings give {list(p.shape)}")
    with torch.no_grad():
        for name, d in deltas.items():
            d.A.copy_(tensors[f"{PREFIX}{name}.A"])
            d.B.copy_(tensors[f"{PREFIX}{name}.B"])


def initial_deltas(deltas: dict[str, DeltaLinear], seed: int) -> None:
    """A ~ U(+-1/sqrt(d_in)) keyed by (seed, module name), B = 0: the update starts at zero."""
    with torch.no_grad():
        for name in sorted(deltas):
            d = deltas[name]
            gen = torch.Generator().manual_seed(keyed_seed(seed, "approx-init", name))
            d.A.copy_((torch.rand(d.A.shape, generator=gen) * 2 - 1) / math.sqrt(d.d_in))
            d.B.zero_()


def _cycle(records: Sequence[Record], seed: int, tag: str, steps: int, size: int) -> list[list[Record]]:
    """`steps` batches of `size` records in a keyed order, wrapping around."""
    if not records:
        return [[] for _ in range(steps)]
    order = sorted(records, key=lambda r: (keyed_hash(seed, tag, r.id), r.id))
    out, i = [], 0
    for _ in range(steps):
        batch = []
        for _ in range(min(size, len(order))):
            batch.append(order[i % len(order)])
            i += 1
        out.append(batch)
    return out


def unlearn_state(trainer, state: dict, forget: Sequence[Record], retain: Sequence[Record],
                  config: ApproxConfig, seed: int, on_step=None) -> tuple[dict, dict]:
    """The state after unlearning `forget` from `state` (an lm trainer's), and a report
    (losses at the start and end). The adapter tensors are carried over unchanged."""
    model = trainer.causal
    trainer._load(state)
    deltas = attach_deltas(model, config)
    if not any(k.startswith(PREFIX) for k in state):
        initial_deltas(deltas, seed)
    params = [p for n in sorted(deltas) for p in (deltas[n].A, deltas[n].B)]
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    trainer._encode(list(forget) + list(retain))
    forget_batches = _cycle(forget, seed, "approx-forget", config.steps, config.batch_size)
    retain_batches = _cycle(retain, seed, "approx-retain", config.steps, config.batch_size)
    losses = []
    try:
        with deterministic():
            model.eval()  # no dropout: the same request on the same state gives the same bits
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, foreach=False)
            for step in range(config.steps):
                f_loss = -torch.cat(trainer._token_logprobs([trainer._pieces[r.id] for r in forget_batches[step]])).mean()
                loss = -f_loss
                r_loss = None
                if config.method != "ga" and retain_batches[step]:
                    r_loss = -torch.cat(trainer._token_logprobs(
                        [trainer._pieces[r.id] for r in retain_batches[step]])).mean()
                    loss = loss + config.retain_weight * r_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append({"forget": f_loss.item(), "retain": None if r_loss is None else r_loss.item()})
                if on_step is not None:
                    on_step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    out = {k: v for k, v in state.items() if k.startswith("param.")}
    out.update(delta_state(deltas))
    report = {"method": config.method, "steps": config.steps, "forget_records": len(forget),
              "retain_records": len(retain), "forget_loss": [losses[0]["forget"], losses[-1]["forget"]]}
    if losses[-1]["retain"] is not None:
        report["retain_loss"] = [losses[0]["retain"], losses[-1]["retain"]]
    if config.method == "gd-sine":
        with torch.no_grad():
            report["max_abs_mlp_delta"] = max(d.delta_weight().abs().max().item() for d in deltas.values() if d.bounded)
        report["bound"] = max(d.bound() for d in deltas.values() if d.bounded)
    return out, report
