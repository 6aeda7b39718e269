"""The unlearning delta on one linear layer: y = layer(x) + x dW^T.

- plain (GA, GD): dW = (alpha/r) B A, a LoRA update, applied as two thin products;
- bounded (GD+Sine, on MLP layers): dW = (alpha/r) sin(omega B A) / sqrt(d_in), the sine
  taken elementwise, so every entry of dW stays within (alpha/r)/sqrt(d_in) however far
  gradient ascent pushes A and B, and the gradient through the sine is bounded too.
  Gradient difference with cross-entropy makes the MLP weights grow without bound during
  ascent; bounding the MLP adapters is the remedy of "Bounded Parameter-Efficient
  Unlearning" (Garg et al., arXiv 2509.24166). The exact constants of that paper could not
  be checked offline; this form (frequency omega, 1/sqrt(d_in)) is that of the same group's
  Sine-LoRA, and the bound is what the tests hold it to.

B starts at zero, so a freshly attached delta leaves the model's outputs unchanged, bit for
bit (x 0 = 0, y + 0 = y).
"""
from __future__ import annotations

import math

import torch


class DeltaLinear(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, d_in: int, d_out: int, rank: int, scale: float,
                 omega: float | None = None):
        super().__init__()
        self.layer = layer
        self.scale, self.omega = scale, omega
        self.d_in = d_in
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)  # on its device, in its dtype
        like = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
        self.A = torch.nn.Parameter(torch.zeros(rank, d_in, **like))
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank, **like))

    @property
    def bounded(self) -> bool:
        return self.omega is not None

    def bound(self) -> float:
        """The largest |dW| entry a bounded delta can reach."""
        return self.scale / math.sqrt(self.d_in)

    def delta_weight(self) -> torch.Tensor:
        if self.bounded:
            return self.scale * torch.sin(self.omega * (self.B @ self.A)) / math.sqrt(self.d_in)
        return self.scale * (self.B @ self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if self.bounded:
            return y + x @ self.delta_weight().T
        return y + self.scale * ((x @ self.A.T) @ self.B.T)
