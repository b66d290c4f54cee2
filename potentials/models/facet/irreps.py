"""Feature layout and the equivariant linear pieces of the Facet model.

Node features are one tensor ``x`` of shape [N, D, C]: D = (lmax+1)² spherical-harmonic components in e3nn's
order (l = 0, 1, …, lmax; m = −l … l within each l, e3nn's real basis) and C channels shared by every l.  Every
l has the parity (−1)^l of the spherical harmonics (0e, 1o, 2e), so O(3) acts on ``x[:, l², (l+1)²]`` by the
Wigner matrix D^l(R) (times det(R)^l).

Linear maps act on channels separately for each l (equivariant by Schur's lemma); a bias is only allowed on l=0.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def irreps_dim(lmax: int) -> int:
    """Number of spherical-harmonic components up to ``lmax``: (lmax+1)²."""
    return (lmax + 1) ** 2


def l_slice(l: int) -> slice:  # noqa: E741 - l is the standard name of the degree
    """Components of degree ``l`` in the [N, D, C] layout."""
    return slice(l * l, (l + 1) * (l + 1))


class IrrepsLinear(nn.Module):
    """Per-degree channel mixing ``y_l = x_l W_l`` (+ bias on l=0): [N, (lmax+1)², C_in] → [N, (lmax+1)², C_out].

    Args:
        lmax: highest degree present in input and output.
        c_in: input channels per component.
        c_out: output channels per component.
        bias: add a learnable bias to the l=0 (scalar) channels.
    """

    def __init__(self, lmax: int, c_in: int, c_out: int, bias: bool = True) -> None:
        super().__init__()
        self.lmax = int(lmax)
        self.weight = nn.Parameter(torch.randn(lmax + 1, c_in, c_out) / math.sqrt(c_in))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D, C_in] with D = (lmax+1)² → [N, D, C_out]."""
        if x.shape[1] != irreps_dim(self.lmax):
            raise ValueError(f"IrrepsLinear(lmax={self.lmax}) expects {irreps_dim(self.lmax)} components, "
                             f"got input of shape {tuple(x.shape)}")
        scalars = x[:, 0:1] @ self.weight[0]
        if self.bias is not None:
            scalars = scalars + self.bias
        if self.lmax == 0:
            return scalars
        parts = [scalars] + [x[:, l_slice(l)] @ self.weight[l] for l in range(1, self.lmax + 1)]
        return torch.cat(parts, dim=1)


class Gate(nn.Module):
    """Gate nonlinearity (as e3nn.nn.Gate): SiLU on scalars, l>0 features scaled by sigmoid of extra scalars.

    Input ``x`` [N, D, C] and ``gates`` [N, lmax·C] (one gate per channel of each l ≥ 1) → [N, D, C].
    """

    def __init__(self, lmax: int) -> None:
        super().__init__()
        self.lmax = int(lmax)

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """x: [N, D, C]; gates: [N, lmax·C] (unused when lmax = 0) → [N, D, C]."""
        scalars = torch.nn.functional.silu(x[:, 0:1])
        if self.lmax == 0:
            return scalars
        n, _, c = x.shape
        g = torch.sigmoid(gates).view(n, self.lmax, c)
        parts = [scalars] + [x[:, l_slice(l)] * g[:, l - 1].unsqueeze(1) for l in range(1, self.lmax + 1)]
        return torch.cat(parts, dim=1)
