"""Spherical-grid self-interaction: irreps → values on a sphere grid → pointwise MLP → irreps.

Each channel c of node features x [N, D, C] (l ≤ lmax) is a band-limited function on the unit sphere,
``f_c(n̂) = Σ_lm x_{lm,c} Y_lm(n̂)``.  Rotating the features rotates the functions, so any pointwise map of
(f_1(n̂), …, f_C(n̂)) — an ordinary MLP across channels, the same at every point — commutes with rotations.
The layer samples the functions at P grid points (one dense matmul with the precomputed [P, D] matrix of
Y_lm at the points), applies the MLP, and projects back with the quadrature rule
``x'_lm = Σ_p w_p Y_lm(n̂_p) g(n̂_p)`` (a second dense matmul with the precomputed [D, P] matrix).

Grid (:func:`potentials.nn.sphere_grid.sphere_grid`, polar axis z): Gauss–Legendre nodes in cos β
(``resolution`` rings) times ``2·resolution`` equally spaced α, weights normalised to sum to 1 (the mean over the
sphere).  It integrates every polynomial of degree ≤ 2·resolution − 1 exactly, so the round trip irreps → grid →
irreps is exact when the MLP is linear and resolution ≥ lmax + 1.  The grid is symmetric under inversion and under
rotations by multiples of π/resolution about z, so parity is exact; a general rotation is exact only up to
quadrature: the MLP output is not band-limited, and its components above degree 2·resolution − 1 − lmax alias into
the projection.  That is the layer's only equivariance error; it falls off exponentially with the resolution (SiLU
is analytic).

Measured relative equivariance error ‖G(D x) − D G(x)‖ / ‖G(x)‖ of to-grid → SiLU → from-grid, float64,
x ~ N(0, 1) per component, 64 nodes × 16 channels, worst of 20 random rotations (defaults marked *;
``tests/models/test_facet_grid.py`` bounds them)::

    resolution  points   lmax=1     lmax=2     lmax=3
        2          8     3.6e-02       -          -
        3         18     4.3e-03    2.3e-01       -
        4         32     6.4e-04    2.3e-02    2.1e-01
        5         50     8.7e-05    6.8e-03    3.1e-02
        6         72     2.0e-05*   1.6e-03    1.5e-02
        8        128     2.0e-07    1.5e-04*   1.9e-03
       10        200     8.2e-09    1.9e-05    3.6e-04*
       12        288     3.7e-10    2.9e-06    6.4e-05
       16        512     1.4e-11    4.2e-08    6.4e-06

Inside a model the error is smaller still (features entering the grid are not all of unit size); the float64
contract suite passes at the defaults.  For comparison, float32 round-off is ~1e-7.

Default resolution: 2·lmax + 4 (72 points for lmax 1, 128 for lmax 2; see :func:`default_resolution`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from potentials.nn.irreps import num_coefficients
from potentials.nn.sphere_grid import sh_grid_matrices


def default_resolution(lmax: int) -> int:
    """Default latitude rings for features up to ``lmax``: 2·lmax + 4 (6 for lmax 1, 8 for lmax 2)."""
    return 2 * int(lmax) + 4


class SphereGridActivation(nn.Module):
    """Pointwise MLP on a sphere grid: [N, D, H] → [N, D, H], D = (lmax+1)².

    The input and output linear layers of the MLP are the per-degree linears around this module (in
    :class:`~potentials.models.facet.conv.Interaction`); a shared linear map of channels commutes with the grid
    projection, and per-degree weights generalise it while staying equivariant.  Here: SiLU, then
    ``depth − 1`` hidden (Linear H→H, SiLU) pairs, all applied at every grid point.

    Args:
        lmax: highest degree of the features.
        channels: H, channels per component.
        resolution: latitude rings of the grid (see the module docstring for the error table); None for
            :func:`default_resolution`.
        depth: number of nonlinearities applied on the grid (1 = a one-hidden-layer MLP overall).
    """

    def __init__(self, lmax: int, channels: int, resolution: int | None = None, depth: int = 1) -> None:
        super().__init__()
        resolution = default_resolution(lmax) if resolution is None else int(resolution)
        if resolution < lmax + 1:
            raise ValueError(f"sphere grid resolution {resolution} cannot represent lmax={lmax}; use >= {lmax + 1}")
        self.lmax, self.resolution = int(lmax), int(resolution)
        to_grid, from_grid = sh_grid_matrices(lmax, resolution, 2 * resolution, polar_axis="z")
        # unit-variance coefficients give a grid function of variance D; rescale to O(1) and back.
        # Kept in float64 (cast at use): a model built in float32 and moved to float64 stays exact.
        scale = math.sqrt(num_coefficients(lmax))
        self.register_buffer("to_grid", to_grid / scale)
        self.register_buffer("from_grid", from_grid * scale)
        self.hidden = nn.ModuleList(nn.Linear(channels, channels) for _ in range(depth - 1))

    @property
    def num_points(self) -> int:
        return self.to_grid.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D, H] coefficients → [N, D, H] coefficients of the MLP applied on the grid."""
        g = torch.nn.functional.silu(self.to_grid.to(x.dtype) @ x)  # [N, P, H]
        for layer in self.hidden:
            g = torch.nn.functional.silu(layer(g))
        return self.from_grid.to(x.dtype) @ g
