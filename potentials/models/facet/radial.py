"""Per-edge tensor-product weights as functions of the edge length: splines (Facet) or a radial MLP (NequIP).

Both give, for every interaction layer and every tensor-product path, weights [E, C] that vanish with two
derivatives at the cutoff.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from potentials.nn.mlp import mlp
from potentials.nn.radial import BesselBasis, PolynomialEnvelope
from potentials.nn.splines import UniformCubicBSpline


class SplineRadial(nn.Module):
    """All layers' weights from one table of cubic B-spline coefficients: one locate, one gather.

    Args:
        cutoff: Å.
        n_knots: knot intervals on [0, cutoff].
        sizes: ``(num_paths, channels)`` of each layer.
    """

    def __init__(self, cutoff: float, n_knots: int, sizes: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.sizes = [(int(p), int(c)) for p, c in sizes]
        self.spline = UniformCubicBSpline(cutoff, n_knots, sum(p * c for p, c in self.sizes))

    def forward(self, r: torch.Tensor) -> list[list[torch.Tensor]]:
        """r: [E] Å → per layer, per path [E, C]."""
        blocks = self.spline(r, [c for p, c in self.sizes for _ in range(p)])
        out, start = [], 0
        for p, _ in self.sizes:
            out.append(blocks[start:start + p])
            start += p
        return out


class BesselMLPRadial(nn.Module):
    """NequIP-style radial weights: an MLP per layer on a Bessel basis, times a polynomial envelope.

    Args:
        cutoff: Å.
        sizes: ``(num_paths, channels)`` of each layer.
        num_basis: Bessel functions.
        hidden: widths of the hidden layers of each MLP.
        envelope_p: exponent of the polynomial envelope.
    """

    def __init__(self, cutoff: float, sizes: Sequence[tuple[int, int]], num_basis: int = 8,
                 hidden: Sequence[int] = (64, 64), envelope_p: int = 6) -> None:
        super().__init__()
        self.sizes = [(int(p), int(c)) for p, c in sizes]
        self.basis = BesselBasis(cutoff, num_basis)
        self.envelope = PolynomialEnvelope(cutoff, envelope_p)
        self.mlps = nn.ModuleList(mlp([num_basis, *hidden, p * c]) for p, c in self.sizes)

    def forward(self, r: torch.Tensor) -> list[list[torch.Tensor]]:
        """r: [E] Å → per layer, per path [E, C]."""
        basis = self.basis(r) * self.envelope(r).unsqueeze(-1)
        return [list(net(basis).view(-1, p, c).unbind(1)) for net, (p, c) in zip(self.mlps, self.sizes, strict=True)]
