"""Product quadrature grids on the unit sphere and the real spherical-harmonic sampling/projection matrices.

Grid: ``res_beta`` Gauss–Legendre nodes in cos β (β measured from the polar axis) times ``res_alpha`` equally spaced
angles α about it; weights sum to 1 (the mean over the sphere, dΩ/4π).  It integrates exactly every polynomial on
the sphere of degree ≤ 2·res_beta − 1 in cos β and trigonometric degree ≤ res_alpha − 1 in α, so for coefficients
up to degree lmax and order mmax (about the polar axis) the round trip coefficients → grid → coefficients is exact
when ``res_beta ≥ lmax + 1`` and ``res_alpha ≥ 2·mmax + 1``.  Rotations about the polar axis by multiples of
2π/res_alpha map the grid onto itself, and so does the inversion when res_alpha is even.

Both model families sample their features here: Facet on a z-polar grid of [resolution, 2·resolution] points
(:mod:`potentials.models.facet.grid`), EquiformerV2 on y-polar node and edge-frame grids
(:mod:`potentials.models.equiformer.grid`; e3nn's m = 0 harmonics are symmetric about y).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from e3nn import o3

_AXES = {"x": 0, "y": 1, "z": 2}


def sphere_grid(res_beta: int, res_alpha: int, polar_axis: str = "y") -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre × uniform-α product grid, float64.

    The point of ring i and angle α_j = 2πj/res_alpha has cos β_i along the polar axis and sin β_i·(cos α_j,
    sin α_j) along the two other axes taken in x, y, z order (x, y about z; x, z about y; y, z about x).

    Args:
        res_beta: rings (Gauss–Legendre nodes in cos β, ascending).
        res_alpha: points per ring.
        polar_axis: "x", "y" or "z".

    Returns:
        points [res_beta·res_alpha, 3] unit vectors (ring-major) and weights [res_beta·res_alpha] summing to 1.
    """
    if res_beta < 1 or res_alpha < 1:
        raise ValueError(f"grid resolution must be positive, got res_beta={res_beta}, res_alpha={res_alpha}")
    if polar_axis not in _AXES:
        raise ValueError(f"polar_axis must be one of {sorted(_AXES)}, got {polar_axis!r}")
    cos_b, w_b = np.polynomial.legendre.leggauss(res_beta)
    sin_b = np.sqrt(1.0 - cos_b**2)
    alpha = 2.0 * math.pi * np.arange(res_alpha) / res_alpha
    polar = _AXES[polar_axis]
    first, second = (axis for axis in range(3) if axis != polar)
    points = np.zeros((res_beta, res_alpha, 3))
    points[..., polar] = cos_b[:, None]
    points[..., first] = np.outer(sin_b, np.cos(alpha))
    points[..., second] = np.outer(sin_b, np.sin(alpha))
    weights = np.repeat(w_b / (2.0 * res_alpha), res_alpha)
    return torch.from_numpy(points.reshape(-1, 3)), torch.from_numpy(weights)


def sh_grid_matrices(lmax: int, res_beta: int, res_alpha: int, index: torch.Tensor | None = None,
                     polar_axis: str = "y") -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling and projection matrices for real spherical harmonics (e3nn, component normalisation), float64.

    Args:
        lmax: highest degree.
        res_beta, res_alpha, polar_axis: the grid (see :func:`sphere_grid`).
        index: [K] coefficients to keep, as positions l² + l + m in the l-major layout (default: all (lmax+1)²).

    Returns:
        to_grid [G, K]: f(p_g) = Σ_k Y_k(p_g) x_k;  from_grid [K, G]: x_k = Σ_g w_g Y_k(p_g) f(p_g), the quadrature
        projection (exactly the inverse of to_grid on band-limited coefficients, see the module docstring).
    """
    points, weights = sphere_grid(res_beta, res_alpha, polar_axis)
    sh = o3.spherical_harmonics(list(range(lmax + 1)), points, normalize=True, normalization="component")
    if index is not None:
        sh = sh[:, index]
    return sh.contiguous(), (sh * weights[:, None]).T.contiguous()
