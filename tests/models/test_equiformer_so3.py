"""EquiformerV2 rotations: edge frames, Wigner-D blocks and the rotation into the edge frame, exact to round-off."""

from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3

from potentials.models.equiformer.so3 import (
    EdgeLayout,
    EdgeRotation,
    edge_frame,
    num_coefficients,
    wigner_blocks,
    wigner_cg_tables,
)

AXES = torch.tensor(
    [[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1], [1e-9, 1, 0], [0, -2.5, 1e-12]],
    dtype=torch.float64,
)


pytestmark = pytest.mark.usefixtures("float64_default")


def _vectors(n: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, 3, generator=gen, dtype=torch.float64) * 2.0, AXES])


def _block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.block_diag(*[b[i] for b in blocks]) for i in range(blocks[0].shape[0])])


def test_layout_order():
    layout = EdgeLayout(3, 2)
    assert layout.num_rows == 4 + 2 * 3 + 2 * 2
    assert layout.rows[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert layout.rows[4:10] == [(1, 1), (2, 1), (3, 1), (1, -1), (2, -1), (3, -1)]
    assert layout.block(2) == (10, 4)
    assert layout.full_index.tolist()[:4] == [0, 2, 6, 12]
    with pytest.raises(ValueError, match="mmax <= lmax"):
        EdgeLayout(2, 3)


def test_edge_frame_maps_edge_onto_y():
    v = _vectors()
    q = edge_frame(v)
    u = v / v.norm(dim=-1, keepdim=True)
    y = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(torch.einsum("eab,eb->ea", q, u), y.expand_as(u), atol=1e-14, rtol=0)
    torch.testing.assert_close(q @ q.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(q),
                               atol=1e-14, rtol=0)
    torch.testing.assert_close(torch.linalg.det(q), torch.ones(len(q), dtype=torch.float64))


def test_edge_frame_zero_vector_and_derivatives_along_axes():
    q0 = edge_frame(torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(q0[0], torch.eye(3, dtype=torch.float64))
    # first and second derivatives stay finite at the poles (±y) and on the other axes
    v = AXES.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(edge_frame(v).pow(3).sum(), v, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), v)
    assert torch.isfinite(g).all() and torch.isfinite(h).all()
    zero = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    (gz,) = torch.autograd.grad(edge_frame(zero).sum(), zero)
    assert torch.isfinite(gz).all()


@pytest.mark.parametrize("lmax", [1, 3, 6])
def test_wigner_blocks_match_e3nn_and_compose(lmax):
    rot = o3.rand_matrix(5, dtype=torch.float64)
    rot2 = o3.rand_matrix(5, dtype=torch.float64)
    tables = wigner_cg_tables(lmax)
    d = wigner_blocks(rot, lmax, tables)
    d2 = wigner_blocks(rot2, lmax, tables)
    d12 = wigner_blocks(rot @ rot2, lmax, tables)
    for l in range(lmax + 1):
        ref = o3.Irrep(l, (-1) ** l).D_from_matrix(rot)
        torch.testing.assert_close(d[l], ref, atol=1e-11, rtol=0)
        torch.testing.assert_close(d12[l], d[l] @ d2[l], atol=1e-12, rtol=0)
        eye = torch.eye(2 * l + 1, dtype=torch.float64).expand_as(d[l])
        torch.testing.assert_close(d[l] @ d[l].transpose(1, 2), eye, atol=1e-12, rtol=0)


def test_rotation_to_edge_frame_and_back_is_identity():
    lmax = 3
    v = _vectors()
    full = EdgeRotation(lmax, lmax).double()(v)  # mmax = lmax keeps everything: an orthogonal matrix
    eye = torch.eye(num_coefficients(lmax), dtype=torch.float64).expand(len(v), -1, -1)
    torch.testing.assert_close(full.transpose(1, 2) @ full, eye, atol=1e-13, rtol=0)
    torch.testing.assert_close(full @ full.transpose(1, 2), eye, atol=1e-13, rtol=0)
    trunc = EdgeRotation(lmax, 1).double()(v)  # truncation: orthonormal rows
    n = trunc.shape[1]
    torch.testing.assert_close(trunc @ trunc.transpose(1, 2), torch.eye(n, dtype=torch.float64).expand(len(v), -1, -1),
                               atol=1e-13, rtol=0)


@pytest.mark.parametrize("mmax", [0, 2])
def test_edge_harmonics_are_pure_m0_in_the_edge_frame(mmax):
    """Y(r̂) seen from the edge frame is Y(ŷ): only m = 0 components, whatever the edge direction."""
    lmax = 4
    v = _vectors(32)
    rot = EdgeRotation(lmax, mmax).double()(v)
    sh = o3.spherical_harmonics(list(range(lmax + 1)), v, normalize=True, normalization="component")
    in_frame = torch.einsum("erk,ek->er", rot, sh)
    y = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    expected = o3.spherical_harmonics(list(range(lmax + 1)), y, normalize=True, normalization="component")
    layout = EdgeLayout(lmax, mmax)
    torch.testing.assert_close(in_frame, expected[:, layout.full_index].expand_as(in_frame), atol=1e-12, rtol=0)


def test_frames_of_rotated_edges_differ_only_by_a_roll():
    """Q(R r)·R·Q(r)ᵀ fixes ŷ: the two frames differ by a rotation about the edge axis, nothing else."""
    v = _vectors()
    rot = o3.rand_matrix(dtype=torch.float64)
    q, q_rot = edge_frame(v), edge_frame(v @ rot.T)
    roll = q_rot @ rot @ q.transpose(1, 2)
    y = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(roll @ y, y.expand(len(v), 3), atol=1e-13, rtol=0)
    angle = torch.atan2(roll[:, 0, 2], roll[:, 0, 0])
    expected = torch.stack([o3.matrix_y(a) for a in angle])
    torch.testing.assert_close(roll, expected, atol=1e-13, rtol=0)
    assert angle.abs().max() > 0.1 * math.pi  # the test is not vacuous: the rolls are generic
