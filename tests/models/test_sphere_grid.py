"""The one S² grid of both model families (potentials.nn.sphere_grid): exact quadrature up to the degree it is built
for and not beyond, its symmetries, its orientation about each polar axis, and the sampling/projection matrices."""

from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3

from potentials.models.equiformer.so3 import EdgeLayout
from potentials.nn.irreps import num_coefficients
from potentials.nn.sphere_grid import sh_grid_matrices, sphere_grid


def _gram(lmax: int, res_beta: int, res_alpha: int, axis: str) -> torch.Tensor:
    """(1/4π)∫ Y_a Y_b dΩ by the grid's quadrature (the identity in component normalisation, if exact)."""
    points, weights = sphere_grid(res_beta, res_alpha, polar_axis=axis)
    sh = o3.spherical_harmonics(list(range(lmax + 1)), points, normalize=True, normalization="component")
    return sh.T @ (sh * weights[:, None])


@pytest.mark.parametrize("axis,res_beta,res_alpha", [
    ("x", 5, 9), ("y", 5, 9), ("z", 5, 9),  # the minimal grid for lmax 4
    ("z", 2, 4), ("z", 5, 10), ("z", 8, 16),  # Facet's [resolution, 2·resolution]
])
def test_quadrature_is_exact_for_products_of_harmonics(axis, res_beta, res_alpha):
    points, weights = sphere_grid(res_beta, res_alpha, polar_axis=axis)
    assert points.shape == (res_beta * res_alpha, 3) and points.dtype == weights.dtype == torch.float64
    torch.testing.assert_close(points.norm(dim=-1), torch.ones(len(points), dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-14)
    # Y_l Y_l' has degree 2·lmax ≤ 2·res_beta − 1 and orders up to 2·lmax ≤ res_alpha − 1
    lmax = min(res_beta - 1, (res_alpha - 1) // 2)
    eye = torch.eye(num_coefficients(lmax), dtype=torch.float64)
    torch.testing.assert_close(_gram(lmax, res_beta, res_alpha, axis), eye, rtol=0, atol=1e-13)


@pytest.mark.parametrize("axis", ["y", "z"])
def test_quadrature_is_exact_no_further_than_its_degree(axis):
    """One ring too few, or one angle too few, and the products of degree-lmax harmonics are no longer integrated."""
    lmax = 3
    eye = torch.eye(num_coefficients(lmax), dtype=torch.float64)
    assert (_gram(lmax, lmax + 1, 2 * lmax + 1, axis) - eye).abs().max() < 1e-13
    assert (_gram(lmax, lmax, 2 * lmax + 1, axis) - eye).abs().max() > 1e-2  # cos β: degree 2·lmax > 2·res_beta − 1
    assert (_gram(lmax, lmax + 1, 2 * lmax, axis) - eye).abs().max() > 1e-2  # α: order 2·lmax > res_alpha − 1


@pytest.mark.parametrize("axis,polar,first,second", [("x", 0, 1, 2), ("y", 1, 0, 2), ("z", 2, 0, 1)])
def test_points_lie_on_rings_about_the_polar_axis(axis, polar, first, second):
    """Ring i at cos β_i (Gauss–Legendre nodes, ascending) along the polar axis; α_j = 2πj/res_alpha measured from
    the first towards the second of the other axes in x, y, z order (EquiformerV2: y-polar, (x, z); Facet: z-polar,
    (x, y))."""
    res_beta, res_alpha = 4, 7
    points, weights = sphere_grid(res_beta, res_alpha, polar_axis=axis)
    rings = points.view(res_beta, res_alpha, 3)
    cos_b = rings[:, 0, polar]
    assert (cos_b.diff() > 0).all() and (rings[..., polar] == cos_b[:, None]).all()
    alpha = torch.atan2(rings[..., second], rings[..., first]) % (2 * math.pi)
    expected = 2 * math.pi * torch.arange(res_alpha, dtype=torch.float64) / res_alpha
    torch.testing.assert_close(alpha, expected.expand(res_beta, -1), rtol=0, atol=1e-12)
    assert (weights.view(res_beta, res_alpha) == weights.view(res_beta, res_alpha)[:, :1]).all()


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_grid_maps_onto_itself_under_its_symmetries(axis):
    """A turn by 2π/res_alpha about the polar axis moves each point one step along its ring; with res_alpha even the
    inversion maps ring i onto ring res_beta − 1 − i, half a turn further."""
    res_beta, res_alpha = 5, 8
    points, _ = sphere_grid(res_beta, res_alpha, polar_axis=axis)
    polar = "xyz".index(axis)
    first, second = (a for a in range(3) if a != polar)
    turn = torch.eye(3, dtype=torch.float64)
    c, s = math.cos(2 * math.pi / res_alpha), math.sin(2 * math.pi / res_alpha)
    turn[first, first], turn[first, second], turn[second, first], turn[second, second] = c, -s, s, c
    rings = points.view(res_beta, res_alpha, 3)
    torch.testing.assert_close(rings @ turn.T, rings.roll(-1, dims=1), rtol=0, atol=1e-14)
    torch.testing.assert_close(-rings, rings.flip(0).roll(-res_alpha // 2, dims=1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("lmax,mmax", [(3, 1), (4, 2)])
def test_matrices_keep_the_indexed_coefficients_and_invert_each_other(lmax, mmax):
    index = EdgeLayout(lmax, mmax).full_index
    to_full, from_full = sh_grid_matrices(lmax, lmax + 1, 2 * mmax + 1, polar_axis="y")
    to_grid, from_grid = sh_grid_matrices(lmax, lmax + 1, 2 * mmax + 1, index, polar_axis="y")
    assert to_grid.shape == ((lmax + 1) * (2 * mmax + 1), len(index)) and from_grid.shape == to_grid.T.shape
    assert torch.equal(to_grid, to_full[:, index]) and torch.equal(from_grid, from_full[index])
    # |m| ≤ mmax about y is band-limited in α at this res_alpha: the round trip is the identity
    torch.testing.assert_close(from_grid @ to_grid, torch.eye(len(index), dtype=torch.float64), rtol=0, atol=1e-12)


def test_rejects_empty_grids_and_unknown_axes():
    with pytest.raises(ValueError, match="resolution must be positive"):
        sphere_grid(0, 4)
    with pytest.raises(ValueError, match="polar_axis"):
        sphere_grid(3, 4, polar_axis="w")
