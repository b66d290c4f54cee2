"""Feature layout of the equivariant models and the layers that act on each degree alone.

Node features are one tensor [N, (lmax+1)², C]: the real spherical-harmonic coefficients in e3nn's order (l = 0, 1,
…, lmax; m = −l … l within each l; the l = 1 block is Cartesian (x, y, z)) and C channels shared by every degree.
Degree l has the parity (−1)^l of the spherical harmonics, so O(3) acts on ``x[:, l², (l+1)²]`` by the Wigner
matrix D^l(R) (times det(R)^l).  A map that mixes channels but never the m components of a degree, with a bias on
l = 0 only, commutes with that action (Schur's lemma): :class:`DegreeLinear`, and the gate of :class:`GateActivation`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def num_coefficients(lmax: int) -> int:
    """Number of real spherical-harmonic coefficients of degrees 0 … lmax, (lmax+1)²."""
    return (lmax + 1) ** 2


def degree_slice(l: int) -> slice:  # noqa: E741 - l is the standard name of the degree
    """Positions of the 2l+1 coefficients of degree ``l`` in the l-major layout."""
    return slice(l * l, (l + 1) * (l + 1))


def degree_index(lmax: int) -> torch.Tensor:
    """[(lmax+1)²] long: the degree l of every coefficient of the l-major layout."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


class DegreeLinear(nn.Module):
    """Degree-wise linear map y_l = x_l W_l (the same W_l for all 2l+1 orders), bias on l = 0 only.

    [N, (lmax+1)², C_in] → [N, (lmax+1)², C_out].  Computed as one batched product over the (lmax+1)² coefficients,
    each with its degree's weight and the bias folded in, instead of a product, a slice and a concatenation per
    degree.  The result is coefficient-major in memory ([N, K, C_out] with strides (C_out, N·C_out, 1)).

    The two model families store and initialise the weight differently; both are kept so that their saved weights
    and their seeded initial weights stay what they were.

    Args:
        lmax: highest degree of input and output.
        in_channels, out_channels: channels per coefficient.
        bias: a learnable bias [C_out] on the l = 0 outputs.
        weight_layout: ``"out_in"``: ``weight`` [lmax+1, C_out, C_in], as ``nn.Linear``, initialised
            U(−1/√C_in, 1/√C_in) (EquiformerV2); ``"in_out"``: ``weight`` [lmax+1, C_in, C_out], initialised
            N(0, 1/C_in) (Facet).
    """

    def __init__(self, lmax: int, in_channels: int, out_channels: int, bias: bool = True,
                 weight_layout: str = "out_in") -> None:
        super().__init__()
        if weight_layout not in ("out_in", "in_out"):
            raise ValueError(f"weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}")
        self.lmax, self.weight_layout = int(lmax), weight_layout
        if weight_layout == "out_in":
            bound = 1.0 / math.sqrt(in_channels)
            self.weight = nn.Parameter(torch.empty(lmax + 1, out_channels, in_channels).uniform_(-bound, bound))
        else:
            self.weight = nn.Parameter(torch.randn(lmax + 1, in_channels, out_channels) / math.sqrt(in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        deg = degree_index(lmax)
        self.register_buffer("degree", deg, persistent=False)
        self.register_buffer("bias_rows", (deg == 0).double().unsqueeze(-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, (lmax+1)², C_in] → [N, (lmax+1)², C_out]."""
        if x.shape[1] != self.degree.shape[0]:
            raise ValueError(f"DegreeLinear(lmax={self.lmax}) expects {self.degree.shape[0]} components, "
                             f"got input of shape {tuple(x.shape)}")
        weight = self.weight.index_select(0, self.degree)
        if self.weight_layout == "out_in":
            weight = weight.transpose(1, 2)  # [K, C_in, C_out]
        if self.bias is None:
            return torch.bmm(x.transpose(0, 1), weight).transpose(0, 1)
        bias = (self.bias_rows.to(x.dtype) * self.bias).unsqueeze(1)  # [K, 1, C_out]
        return torch.baddbmm(bias, x.transpose(0, 1), weight).transpose(0, 1)


class GateActivation(nn.Module):
    """Gate activation: out_0 = SiLU(x_0);  out_l = x_l · sigmoid(g_l) for l > 0 (as e3nn.nn.Gate).

    One gate g_l per (degree, channel), computed by the caller from invariant features: ``gates`` [B, lmax·C],
    degree-major.  ``row_degrees`` gives the degree of each row of the layout (default: the l-major layout up to
    lmax); its first row must be l = 0, and the rest must consist of runs of consecutive degrees (true of the
    l-major node layout and of EquiformerV2's m-major edge layout), so that each run is gated by a slice of the gates
    without gathering them.
    """

    def __init__(self, lmax: int, row_degrees: torch.Tensor | None = None) -> None:
        super().__init__()
        self.lmax = int(lmax)
        degrees = [int(d) for d in (degree_index(lmax) if row_degrees is None else row_degrees)]
        if degrees[0] != 0 or 0 in degrees[1:]:
            raise ValueError(f"the layout must start with its only l = 0 row, got degrees {degrees}")
        # runs (length, first degree, step): l-major rows repeat a degree 2l+1 times, m-major rows step by one
        self.runs: list[tuple[int, int, int]] = []
        start = 1
        while start < len(degrees):
            end = start + 1
            step = 1 if end < len(degrees) and degrees[end] == degrees[start] + 1 else 0
            while end < len(degrees) and degrees[end] == degrees[end - 1] + step:
                end += 1
            self.runs.append((end - start, degrees[start], step))
            start = end

    def forward(self, gates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """gates [B, lmax·C], x [B, K, C] → [B, K, C]."""
        g = torch.sigmoid(gates).reshape(x.shape[0], self.lmax, x.shape[-1])
        blocks = x.split([1] + [n for n, _, _ in self.runs], dim=1)
        out = [nn.functional.silu(blocks[0])]
        for block, (n, first, step) in zip(blocks[1:], self.runs, strict=True):
            out.append(block * (g[:, first - 1:first - 1 + n] if step else g[:, first - 1:first]))
        return torch.cat(out, dim=1)
