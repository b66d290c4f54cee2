"""EquiformerV2 building blocks, each alone: exact equivariance (to round-off) of everything but the S² grid."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3
from torch_geometric.utils import softmax

from potentials.models.equiformer.attention import (
    EdgeData,
    EdgeDegreeEmbedding,
    SO2GraphAttention,
    envelope_softmax,
    gather_pairs,
)
from potentials.models.equiformer.grid import S2Grid
from potentials.models.equiformer.layers import EquivariantLayerNorm, FeedForwardGate
from potentials.models.equiformer.so2 import SO2Convolution
from potentials.models.equiformer.so3 import EdgeLayout, EdgeRotation, wigner_blocks, wigner_cg_tables
from potentials.nn.irreps import DegreeLinear, GateActivation, num_coefficients

LMAX, MMAX, C = 3, 2, 8
AXES = torch.tensor([[0.0, 1.3, 0], [0, -0.9, 0], [0, 0, 1.1], [0, 0, -1.4], [1.2, 0, 0], [-1.0, 0, 0]])


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def _wigner(rot: torch.Tensor, lmax: int = LMAX) -> torch.Tensor:
    """Block-diagonal D(rot) [(lmax+1)², (lmax+1)²] in float64."""
    blocks = wigner_blocks(rot[None], lmax, wigner_cg_tables(lmax))
    return torch.block_diag(*[b[0] for b in blocks])


def _edge_vectors(n: int = 20) -> torch.Tensor:
    return torch.cat([torch.randn(n, 3, dtype=torch.float64) * 1.5, AXES.double()])


def _graph(n_nodes: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs of ``n_nodes`` random points, plus one edge exactly along +y, one along −z."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_nodes, 3, generator=gen, dtype=torch.float64) * 1.5
    pos[1] = pos[0] + torch.tensor([0.0, 1.7, 0.0], dtype=torch.float64)
    pos[2] = pos[0] + torch.tensor([0.0, 0.0, -1.6], dtype=torch.float64)
    j, i = torch.meshgrid(torch.arange(n_nodes), torch.arange(n_nodes), indexing="ij")
    keep = j != i
    edge_index = torch.stack([j[keep], i[keep]])
    return pos, edge_index


def _edge_data(edge_index: torch.Tensor, vec: torch.Tensor, n_nodes: int, lmax: int = LMAX, mmax: int = MMAX
               ) -> EdgeData:
    r = vec.norm(dim=-1)
    radial = torch.exp(-((r[:, None] - torch.linspace(0, 4, 6, dtype=vec.dtype)) ** 2))
    envelope = torch.clamp(1 - r / 6.0, min=0) ** 3
    rot = EdgeRotation(lmax, mmax).double()(vec)
    return EdgeData(edge_index[0], edge_index[1], rot, radial, envelope, n_nodes)


def test_so2_convolution_commutes_with_rolls():
    layout = EdgeLayout(LMAX, MMAX)
    conv = SO2Convolution(layout, C, 5, extra_m0_channels=3, radial_sizes=[4, 7]).double()
    x = torch.randn(10, layout.num_rows, C, dtype=torch.float64)
    feats = torch.randn(10, 4, dtype=torch.float64)
    y, extra = conv(x, feats)
    for angle in (0.3, 1.9, -2.4):
        roll = _wigner(o3.matrix_y(torch.tensor(angle, dtype=torch.float64)))
        roll = roll[layout.full_index][:, layout.full_index]  # rolls never mix orders: the restriction is exact
        y_rolled, extra_rolled = conv(roll @ x, feats)
        torch.testing.assert_close(y_rolled, roll @ y, atol=1e-12, rtol=0)
        torch.testing.assert_close(extra_rolled, extra, atol=1e-12, rtol=0)


def test_so2_convolution_is_equivariant_through_the_edge_frame():
    """x ↦ rot(r)ᵀ·conv(rot(r)·x): rotating x by D(R) and r by R rotates the output by D(R), edges along axes too."""
    layout = EdgeLayout(LMAX, MMAX)
    rotation = EdgeRotation(LMAX, MMAX).double()
    conv = SO2Convolution(layout, C, C, radial_sizes=[4, 7]).double()
    vec = _edge_vectors()
    x = torch.randn(len(vec), num_coefficients(LMAX), C, dtype=torch.float64)
    feats = torch.randn(len(vec), 4, dtype=torch.float64)

    def f(x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        rot = rotation(vec)
        return rot.transpose(1, 2) @ conv(rot @ x, feats)[0]

    out = f(x, vec)
    for rot in [o3.rand_matrix(dtype=torch.float64) for _ in range(3)] + [o3.matrix_x(torch.tensor(torch.pi / 2))]:
        d = _wigner(rot.double())
        torch.testing.assert_close(f(d @ x, vec @ rot.double().T), d @ out, atol=1e-11, rtol=0)


def test_layer_norm_linear_and_gate_are_equivariant():
    x = torch.randn(7, num_coefficients(LMAX), C, dtype=torch.float64) * 3
    d = _wigner(o3.rand_matrix(dtype=torch.float64))
    norm = EquivariantLayerNorm(LMAX, C).double()
    with torch.no_grad():
        norm.affine_weight.uniform_(0.5, 1.5)
    out = norm(x)
    torch.testing.assert_close(norm(d @ x), d @ out, atol=1e-12, rtol=0)
    # l = 0 is a plain LayerNorm; the balanced RMS of l > 0 is 1 before the affine weight
    torch.testing.assert_close(out[:, 0].mean(-1), torch.zeros(7, dtype=torch.float64), atol=1e-12, rtol=0)
    linear = DegreeLinear(LMAX, C, 5).double()
    torch.testing.assert_close(linear(d @ x), d @ linear(x), atol=1e-12, rtol=0)
    ffn = FeedForwardGate(LMAX, C, 6, C).double()
    torch.testing.assert_close(ffn(d @ x), d @ ffn(x), atol=1e-12, rtol=0)
    gate = GateActivation(LMAX, torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]))
    gates = torch.randn(7, LMAX * C, dtype=torch.float64)
    torch.testing.assert_close(gate(gates, d @ x), d @ gate(gates, x), atol=1e-12, rtol=0)


def test_gather_pairs_matches_concatenated_gathers_with_derivatives():
    pos, edge_index = _graph(5)
    edge = _edge_data(edge_index, pos[edge_index[1]] - pos[edge_index[0]], 5)
    x = torch.randn(5, num_coefficients(LMAX), C, dtype=torch.float64, requires_grad=True)
    pair = gather_pairs(x, edge)
    expected = torch.cat([x[edge.src], x[edge.dst]], dim=-1)
    assert torch.equal(pair, expected)
    probe = torch.randn_like(pair)
    grad = torch.autograd.grad((pair * probe).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad((expected * probe).sum(), x, create_graph=True)[0])
    torch.autograd.gradcheck(lambda t: gather_pairs(t, edge), (x,))
    torch.autograd.gradgradcheck(lambda t: gather_pairs(t, edge) ** 2, (x,))


def test_envelope_softmax():
    logits = torch.randn(9, 2, dtype=torch.float64) * 5
    index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    ones = torch.ones(9, dtype=torch.float64)
    torch.testing.assert_close(envelope_softmax(logits, ones, index, 4), softmax(logits, index, num_nodes=4))
    env = torch.rand(9, dtype=torch.float64)
    env[3] = 0.0  # an edge at the cutoff gets no weight and leaves the others' sum at 1
    w = envelope_softmax(logits, env, index, 4)
    assert (w[3] == 0).all()
    sums = torch.zeros(4, 2, dtype=torch.float64).index_add_(0, index, w)
    torch.testing.assert_close(sums[:3], torch.ones(3, 2, dtype=torch.float64))
    manual = env[:, None] * logits.exp()
    manual = manual / torch.zeros(4, 2, dtype=torch.float64).index_add_(0, index, manual)[index]
    torch.testing.assert_close(w, manual)


def test_edge_degree_embedding_is_equivariant():
    pos, edge_index = _graph()
    z = torch.tensor([1, 6, 8, 6, 1, 29])
    module = EdgeDegreeEmbedding(LMAX, C, [6, 5, 5], avg_num_neighbors=3.0).double()
    vec = pos[edge_index[0]] - pos[edge_index[1]]
    out = module(z, _edge_data(edge_index, vec, len(z)))
    rot = o3.rand_matrix(dtype=torch.float64)
    rotated = module(z, _edge_data(edge_index, vec @ rot.T, len(z)))
    torch.testing.assert_close(rotated, _wigner(rot) @ out, atol=1e-12, rtol=0)
    assert out[:, 1:].abs().max() > 1e-3  # the l > 0 part is not trivially zero


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "s2-fine-grid"])
def test_attention_is_equivariant(gate):
    """Gate activation: exact.  S² activation on a fine edge grid: quadrature error far below the tolerance."""
    pos, edge_index = _graph()
    z = torch.tensor([1, 6, 8, 6, 1, 29])
    layout = EdgeLayout(LMAX, MMAX)
    grid = None if gate else S2Grid(LMAX, layout.full_index, LMAX + 1, 64)
    attn = SO2GraphAttention(layout, grid, C, 6, 2, 4, 3, C, [6, 5, 5], use_gate_act=gate).double()
    x = torch.randn(len(z), num_coefficients(LMAX), C, dtype=torch.float64)
    vec = pos[edge_index[0]] - pos[edge_index[1]]
    out = attn(x, z, _edge_data(edge_index, vec, len(z)))
    for rot in [o3.rand_matrix(dtype=torch.float64) for _ in range(2)]:
        d = _wigner(rot)
        rotated = attn(d @ x, z, _edge_data(edge_index, vec @ rot.T, len(z)))
        torch.testing.assert_close(rotated, d @ out, atol=1e-11 * out.abs().max().item(), rtol=0)
