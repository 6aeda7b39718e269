"""Approximate unlearning baselines (GA, GD, GD+Sine): NOT exact, never verifiable.

They exist to be audited next to exact deletion (`unlearn audit`): a model fine-tuned on
all the data is "unlearned" in place by a few optimizer steps, the way most of the
literature forgets. Laid out like a peft tuner: `config` (what a run asks for), `layer`
(the unlearning update on one linear layer, plain or sine-bounded), `unlearn` (attaching
the updates to a model, and the optimization loop). Only `config` is imported here, so
that reading a run's configuration does not load torch.
"""
from .config import APPROX_METHODS, ApproxConfig

__all__ = ["APPROX_METHODS", "ApproxConfig"]
