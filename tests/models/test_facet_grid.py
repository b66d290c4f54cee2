"""Sphere-grid self-interaction: exact round trip, exact parity, and the measured rotation error bound (the grid
itself: tests/models/test_sphere_grid.py)."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from potentials.models.facet.grid import SphereGridActivation, default_resolution
from tests.models.reference import e3nn_wigner

H = 16


pytestmark = pytest.mark.usefixtures("float64_default")



def _rotation_error(layer: SphereGridActivation, rotations: int = 10, seed: int = 0) -> float:
    """Worst ‖G(D x) − D G(x)‖ / ‖G(x)‖ over random rotations, x ~ N(0, 1) per component."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, (layer.lmax + 1) ** 2, H, generator=gen, dtype=torch.float64)
    worst = 0.0
    for _ in range(rotations):
        d = e3nn_wigner(layer.lmax, o3.rand_matrix(dtype=torch.float64))
        ref = d @ layer(x)
        worst = max(worst, ((layer(d @ x) - ref).norm() / ref.norm()).item())
    return worst


def test_round_trip_is_exact_without_the_nonlinearity():
    layer = SphereGridActivation(2, H, resolution=3)
    x = torch.randn(7, 9, H)
    back = layer.from_grid @ (layer.to_grid @ x)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lmax", [1, 2])
def test_inversion_is_exact(lmax):
    layer = SphereGridActivation(lmax, H)
    x = torch.randn(9, (lmax + 1) ** 2, H)
    parity = torch.cat([torch.full((2 * l + 1,), (-1.0) ** l) for l in range(lmax + 1)]).view(1, -1, 1)
    torch.testing.assert_close(layer(parity * x), parity * layer(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("lmax,bound", [(1, 5e-5), (2, 5e-4)])
def test_rotation_error_at_default_resolution_is_within_the_documented_bound(lmax, bound):
    """The table in potentials/models/facet/grid.py: 1.4e-5 (lmax 1, 6 rings), 1.3e-4 (lmax 2, 8 rings)."""
    layer = SphereGridActivation(lmax, H)
    assert layer.resolution == default_resolution(lmax)
    error = _rotation_error(layer)
    assert error < bound
    assert error > 1e-9  # a quadrature error, not exact: the measurement is not vacuous


def test_rotation_error_falls_with_resolution():
    torch.manual_seed(0)
    errors = [_rotation_error(SphereGridActivation(1, H, resolution=res), rotations=4) for res in (3, 6, 9, 12)]
    assert all(b < a / 10 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-8


def test_hidden_grid_layers_keep_the_bound():
    torch.manual_seed(1)
    layer = SphereGridActivation(1, H, depth=2)
    assert len(layer.hidden) == 1
    assert _rotation_error(layer, rotations=4) < 1e-4


def test_rejects_a_grid_too_coarse_for_lmax():
    with pytest.raises(ValueError, match="cannot represent lmax=2"):
        SphereGridActivation(2, H, resolution=2)
