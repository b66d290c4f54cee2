"""Cubic B-spline radial functions (potentials.nn.splines): basis identities, smoothness, reference values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from potentials.nn.splines import UniformCubicBSpline, cubic_bspline_values, spline_gather

CUTOFF = 5.0
N_KNOTS = 10
H = CUTOFF / N_KNOTS


@pytest.fixture
def spline() -> UniformCubicBSpline:
    torch.manual_seed(0)
    return UniformCubicBSpline(CUTOFF, N_KNOTS, num_out=6).double()


def _derivatives(spline: UniformCubicBSpline, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """f, f', f'' at r: [E] → three [E, F] tensors (by autograd)."""
    r = r.clone().requires_grad_(True)
    f = spline(r)
    d1 = torch.stack([torch.autograd.grad(f[:, k].sum(), r, create_graph=True)[0] for k in range(f.shape[1])], 1)
    d2 = torch.stack([torch.autograd.grad(d1[:, k].sum(), r, retain_graph=True)[0] for k in range(f.shape[1])], 1)
    return f.detach(), d1.detach(), d2.detach()


def test_partition_of_unity():
    u = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    values = cubic_bspline_values(u)
    torch.testing.assert_close(values.sum(-1), torch.ones_like(u), rtol=0, atol=1e-15)
    assert (values >= 0).all()
    # all free coefficients equal to one: f ≡ 1 wherever no zeroed (cutoff) basis function reaches
    ones = UniformCubicBSpline(CUTOFF, N_KNOTS, num_out=1).double()
    with torch.no_grad():
        ones.coefficients.fill_(1.0)
    r = torch.linspace(0.0, (N_KNOTS - 3) * H - 1e-9, 200, dtype=torch.float64)
    torch.testing.assert_close(ones(r)[:, 0], torch.ones_like(r), rtol=0, atol=1e-14)
    assert ones(torch.tensor([(N_KNOTS - 1.5) * H], dtype=torch.float64)).item() < 1.0 - 1e-3


def test_matches_scipy_bspline(spline):
    coeffs = spline.coefficients.detach().numpy()
    full = np.concatenate([coeffs, np.zeros((3, coeffs.shape[1]))])  # the three zeroed cutoff functions
    knots = H * np.arange(-3, N_KNOTS + 4)  # n_coef + k + 1 knots, uniform
    reference = BSpline(knots, full, 3, extrapolate=False)
    r = np.random.default_rng(0).uniform(0.0, CUTOFF, 300)
    f, d1, _ = _derivatives(spline, torch.from_numpy(r))
    np.testing.assert_allclose(f.numpy(), reference(r), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d1.numpy(), reference.derivative()(r), rtol=1e-10, atol=1e-10)


def test_c2_continuity_at_knots(spline):
    eps = 1e-7
    knots = torch.arange(1, N_KNOTS, dtype=torch.float64) * H
    left = _derivatives(spline, knots - eps)
    right = _derivatives(spline, knots + eps)
    scale = [x.abs().max().item() for x in _derivatives(spline, torch.linspace(0, CUTOFF, 500, dtype=torch.float64))]
    for order, (a, b) in enumerate(zip(left, right, strict=True)):
        # a jump would show as O(1)·scale; continuity leaves O(eps) differences
        assert (a - b).abs().max().item() < 1e-5 * scale[order] + 1e-9, f"derivative {order} jumps at a knot"
    # the third derivative of a generic cubic spline does jump at knots, so the check can tell a jump
    d = 1e-4
    d2 = [_derivatives(spline, knots + s * d)[2] for s in (-2, -1, 1, 2)]
    third_left, third_right = (d2[1] - d2[0]) / d, (d2[3] - d2[2]) / d
    assert (third_right - third_left).abs().max().item() > 1e-2 * scale[2] / H


def test_vanishes_smoothly_at_cutoff(spline):
    at = torch.tensor([CUTOFF, CUTOFF + 0.3, 2 * CUTOFF], dtype=torch.float64)
    f, d1, d2 = _derivatives(spline, at)
    assert (f == 0).all() and (d1 == 0).all() and (d2 == 0).all()
    for delta in (1e-2, 1e-3):
        f, d1, d2 = _derivatives(spline, torch.tensor([CUTOFF - delta], dtype=torch.float64))
        c = spline.coefficients.abs().max().item()
        assert f.abs().max() < c * (delta / H) ** 3  # f ~ δ³, f' ~ δ², f'' ~ δ
        assert d1.abs().max() < c * (delta / H) ** 2 / H
        assert d2.abs().max() < 2 * c * (delta / H) / H**2
    f, _, _ = _derivatives(spline, torch.tensor([CUTOFF - 1.5 * H], dtype=torch.float64))
    assert f.abs().max() > 1e-3  # not trivially zero before the cutoff


def test_split_gathers_match_full(spline):
    r = torch.rand(50, dtype=torch.float64) * CUTOFF
    blocks = spline(r, [2, 1, 3])
    torch.testing.assert_close(torch.cat(blocks, 1), spline(r), rtol=0, atol=1e-15)


def test_gather_gradients_to_second_order():
    """Training on forces differentiates dE/dr with respect to the coefficients: double backward must hold."""
    torch.manual_seed(1)
    table = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    values = torch.rand(7, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, 6, (7, 1)) + torch.arange(4)
    assert torch.autograd.gradcheck(lambda v, t: spline_gather(v, rows, t), (values, table))
    assert torch.autograd.gradgradcheck(lambda v, t: spline_gather(v, rows, t), (values, table))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_knots"):
        UniformCubicBSpline(CUTOFF, 2, 4)
    with pytest.raises(ValueError, match="cutoff"):
        UniformCubicBSpline(0.0, 8, 4)
