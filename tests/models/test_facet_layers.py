"""Facet building blocks against e3nn: the hand-written tensor product (the gate and the degree-wise linears are
the shared ones of potentials.nn.irreps, tested in test_irreps.py)."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from potentials.models.facet.tensor_product import EdgeTensorProduct
from potentials.nn.irreps import degree_slice
from tests.models.reference import e3nn_wigner

E, C = 40, 5


pytestmark = pytest.mark.usefixtures("float64_default")



def _sh(vec: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    y = o3.spherical_harmonics(list(range(lmax + 1)), vec, normalize=True, normalization="component")
    return [y[:, degree_slice(l)].contiguous() for l in range(lmax + 1)]


def _split(x: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """[E, D, C] → per-degree gathered inputs as the tensor product takes them."""
    return [x[:, 0]] + [x[:, degree_slice(l)].contiguous() for l in range(1, lmax + 1)]


def _to_e3nn(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """[E, D, C] (m-major) → e3nn's mul-major flat layout of "C x l" blocks."""
    return torch.cat([x[:, degree_slice(l)].transpose(1, 2).reshape(x.shape[0], -1) for l in range(lmax + 1)], 1)


def _irreps(mul: int, lmax: int) -> o3.Irreps:
    return o3.Irreps([(mul, (l, (-1) ** l)) for l in range(lmax + 1)])


@pytest.mark.parametrize("lmax_in,lmax_out", [(0, 2), (2, 2), (2, 0), (1, 1)])
def test_tensor_product_matches_e3nn(lmax_in, lmax_out):
    torch.manual_seed(0)
    lmax_sh = 2
    tp = EdgeTensorProduct(lmax_in, lmax_sh, lmax_out).double()
    x = torch.randn(E, (lmax_in + 1) ** 2, C, dtype=torch.float64)
    vec = torch.randn(E, 3, dtype=torch.float64)
    weights = [torch.randn(E, C, dtype=torch.float64) for _ in tp.paths]
    ours = tp(_split(x, lmax_in), _sh(vec, lmax_sh), weights)

    irreps_out = o3.Irreps([(C, (l3, (-1) ** l3)) for _, _, l3 in tp.paths])
    instructions = [(l1, l2, k, "uvu", True) for k, (l1, l2, _) in enumerate(tp.paths)]
    ref_tp = o3.TensorProduct(_irreps(C, lmax_in), _irreps(1, lmax_sh), irreps_out, instructions,
                              shared_weights=False, internal_weights=False, irrep_normalization="component",
                              path_normalization="none").double()
    y = o3.spherical_harmonics(list(range(lmax_sh + 1)), vec, normalize=True, normalization="component")
    ref = ref_tp(_to_e3nn(x, lmax_in), y, torch.cat(weights, dim=1))
    start = 0
    for (_, _, l3), msg in zip(tp.paths, ours, strict=True):
        block = ref[:, start:start + C * (2 * l3 + 1)].view(E, C, 2 * l3 + 1).transpose(1, 2)
        torch.testing.assert_close(msg, block, rtol=1e-12, atol=1e-12)
        start += C * (2 * l3 + 1)


def test_tensor_product_is_o3_equivariant():
    torch.manual_seed(1)
    tp = EdgeTensorProduct(2, 2, 2).double()
    x = torch.randn(E, 9, C, dtype=torch.float64)
    vec = torch.randn(E, 3, dtype=torch.float64)
    weights = [torch.randn(E, C, dtype=torch.float64) for _ in tp.paths]
    ref = tp(_split(x, 2), _sh(vec, 2), weights)
    for rot in (o3.rand_matrix(dtype=torch.float64), -o3.rand_matrix(dtype=torch.float64)):  # with inversion
        out = tp(_split(e3nn_wigner(2, rot) @ x, 2), _sh(vec @ rot.T, 2), weights)
        for (_, _, l3), a, b in zip(tp.paths, out, ref, strict=True):
            d = o3.Irrep(l3, (-1) ** l3).D_from_matrix(rot)
            torch.testing.assert_close(a, d @ b, rtol=0, atol=1e-12)
