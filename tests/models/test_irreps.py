"""The shared degree-wise pieces (potentials.nn.irreps): index helpers, the degree-wise linear map in both weight
layouts, and the gate activation in both row layouts, against their definitions and e3nn."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3
from e3nn.math import normalize2mom
from e3nn.nn import Gate as E3nnGate

from potentials.models.equiformer.so3 import EdgeLayout
from potentials.nn.irreps import DegreeLinear, GateActivation, degree_index, degree_slice, num_coefficients
from tests.models.reference import e3nn_wigner

LMAX, C = 3, 5
LAYOUTS = ["out_in", "in_out"]

pytestmark = pytest.mark.usefixtures("float64_default")


def _to_e3nn(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """[N, D, C] → e3nn's mul-major flat layout of "C x l" blocks."""
    return torch.cat([x[:, degree_slice(l)].transpose(1, 2).reshape(x.shape[0], -1) for l in range(lmax + 1)], 1)


def test_index_helpers_agree_with_each_other():
    index = degree_index(LMAX)
    assert len(index) == num_coefficients(LMAX) == 16
    for l in range(LMAX + 1):  # noqa: E741
        assert (index[degree_slice(l)] == l).all() and len(index[degree_slice(l)]) == 2 * l + 1


def _weight(linear: DegreeLinear, l: int) -> torch.Tensor:  # noqa: E741
    """W_l as [C_in, C_out] in either storage layout."""
    return linear.weight[l].T if linear.weight_layout == "out_in" else linear.weight[l]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_degree_linear_is_one_map_per_degree_with_bias_on_l0(layout, bias):
    """The batched product against the definition: y_l = x_l W_l per degree, bias on l = 0 only (with gradients)."""
    torch.manual_seed(0)
    linear = DegreeLinear(LMAX, C, 4, bias=bias, weight_layout=layout)
    params = [linear.weight]
    if bias:
        with torch.no_grad():
            linear.bias.uniform_(-1, 1)
        params.append(linear.bias)
    else:
        assert linear.bias is None
    x = torch.randn(7, num_coefficients(LMAX), C, requires_grad=True)
    blocks = [x[:, degree_slice(l)] @ _weight(linear, l) for l in range(LMAX + 1)]
    if bias:
        blocks[0] = blocks[0] + linear.bias
    want = torch.cat(blocks, dim=1)
    got = linear(x)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=0)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [x, *params], grad), torch.autograd.grad(want, [x, *params], grad),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # a following map reads the coefficient-major result as it is
    second = DegreeLinear(LMAX, 4, 3, weight_layout=layout)
    torch.testing.assert_close(second(got), second(got.contiguous()), atol=1e-13, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_degree_linear_is_o3_equivariant_and_rejects_a_wrong_shape(layout):
    torch.manual_seed(3)
    linear = DegreeLinear(2, C, 7, weight_layout=layout)
    x = torch.randn(6, 9, C)
    for rot in (o3.rand_matrix(), -o3.rand_matrix()):  # with inversion: degree l has parity (−1)^l
        d = e3nn_wigner(2, rot)
        torch.testing.assert_close(linear(d @ x), d @ linear(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expects 9 components"):
        linear(torch.randn(6, 4, C))


def test_degree_linear_weight_layouts_keep_their_shapes_and_initialisation():
    """Saved weights of both model families load: each layout keeps its parameter names, shapes and initial law."""
    torch.manual_seed(0)
    out_in, in_out = DegreeLinear(2, 400, 300), DegreeLinear(2, 400, 300, bias=False, weight_layout="in_out")
    assert {k: tuple(v.shape) for k, v in out_in.state_dict().items()} == {"weight": (3, 300, 400), "bias": (300,)}
    assert {k: tuple(v.shape) for k, v in in_out.state_dict().items()} == {"weight": (3, 400, 300)}
    bound, w_out_in, w_in_out = 400**-0.5, out_in.weight.detach(), in_out.weight.detach()
    assert w_out_in.abs().max() <= bound and w_out_in.std().item() == pytest.approx(bound / 3**0.5, rel=0.01)  # U(±b)
    assert w_in_out.abs().max() > bound and w_in_out.std().item() == pytest.approx(bound, rel=0.01)  # N(0, b²)
    with pytest.raises(ValueError, match="weight_layout"):
        DegreeLinear(2, 4, 4, weight_layout="in-out")


def test_gate_matches_e3nn_gate():
    torch.manual_seed(2)
    lmax, n = 2, 11
    x = torch.randn(n, 9, C)
    gates = torch.randn(n, lmax * C)
    ours = GateActivation(lmax)(gates, x)
    ref_gate = E3nnGate(f"{C}x0e", [torch.nn.functional.silu], f"{lmax * C}x0e", [torch.sigmoid],
                        o3.Irreps([(C, (l, (-1) ** l)) for l in range(1, lmax + 1)]))
    flat = torch.cat([x[:, 0], gates, _to_e3nn(x, lmax)[:, C:]], dim=1)
    # e3nn rescales each activation to unit second moment; undo its two constants
    c_silu = normalize2mom(torch.nn.functional.silu).cst
    c_sigmoid = normalize2mom(torch.sigmoid).cst
    ref = ref_gate(flat)
    ref = torch.cat([ref[:, :C] / c_silu, ref[:, C:] / c_sigmoid], dim=1)
    torch.testing.assert_close(_to_e3nn(ours, lmax), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mmax", [1, 2, 3])
def test_gate_on_the_edge_layout_gates_each_row_by_its_degree(mmax):
    """The m-major edge layout (runs of consecutive degrees) gives each row the gate of its degree, as the l-major
    node layout does: gating the rows picked from a node tensor equals picking the rows of the gated tensor."""
    torch.manual_seed(4)
    layout = EdgeLayout(LMAX, mmax)
    degrees = torch.tensor([l for l, _ in layout.rows])
    x = torch.randn(6, num_coefficients(LMAX), C)
    gates = torch.randn(6, LMAX * C)
    node = GateActivation(LMAX)(gates, x)
    edge = GateActivation(LMAX, degrees)(gates, x[:, layout.full_index])
    torch.testing.assert_close(edge, node[:, layout.full_index], rtol=0, atol=0)
    with pytest.raises(ValueError, match="only l = 0 row"):
        GateActivation(LMAX, degrees.flip(0))
