"""Radial building blocks: smooth cutoff envelopes and radial bases of edge lengths (Å)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PolynomialEnvelope(nn.Module):
    """Smooth cutoff u(r) (Klicpera et al. 2020): 1 at r=0, and u, u', u'' vanish at r = cutoff.

    u(x) = 1 − (p+1)(p+2)/2·x^p + p(p+2)·x^{p+1} − p(p+1)/2·x^{p+2},  x = r/cutoff;  0 for r ≥ cutoff.
    """

    def __init__(self, cutoff: float, p: int = 6) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = int(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """r: [E] distances, Å → [E] envelope values in [0, 1]."""
        p = self.p
        x = r / self.cutoff
        u = (1.0 - 0.5 * (p + 1) * (p + 2) * x.pow(p) + p * (p + 2) * x.pow(p + 1)
             - 0.5 * p * (p + 1) * x.pow(p + 2))
        return torch.where(x < 1.0, u, torch.zeros_like(u))


class BesselBasis(nn.Module):
    """sin(nπr/c)/r · sqrt(2/c), n = 1..num_basis (the NequIP/DimeNet basis), optionally with trainable frequencies."""

    def __init__(self, cutoff: float, num_basis: int = 8, trainable: bool = False) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        freqs = torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) * math.pi / self.cutoff
        self.freqs = nn.Parameter(freqs, requires_grad=trainable)
        self.prefactor = math.sqrt(2.0 / self.cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """r: [E] Å → [E, num_basis]."""
        r = r.unsqueeze(-1)
        safe = torch.where(r > 1e-9, r, torch.ones_like(r))
        out = self.prefactor * torch.sin(self.freqs.to(r.dtype) * safe) / safe
        # the r → 0 limit of sin(kr)/r is k
        return torch.where(r > 1e-9, out, self.prefactor * self.freqs.to(r.dtype).expand_as(out))


class GaussianBasis(nn.Module):
    """exp(−(r − μ_k)²/(2σ²)) with centres μ_k evenly spaced on [start, cutoff]."""

    def __init__(self, cutoff: float, num_basis: int = 32, start: float = 0.0, width: float | None = None) -> None:
        super().__init__()
        centers = torch.linspace(start, float(cutoff), num_basis, dtype=torch.get_default_dtype())
        self.register_buffer("centers", centers)
        spacing = (float(cutoff) - start) / max(num_basis - 1, 1)
        self.coeff = -0.5 / (width if width is not None else spacing) ** 2

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """r: [E] Å → [E, num_basis]."""
        return torch.exp(self.coeff * (r.unsqueeze(-1) - self.centers.to(r.dtype)) ** 2)
