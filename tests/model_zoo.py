"""Small float64 instances of every model family, for the contract suite (tests/test_model_contract.py).

Each entry maps a name to a factory ``(cutoff) -> nn.Module`` following the model contract.
"""

from __future__ import annotations

from potentials.models.egnn import EGNN
from potentials.models.equiformer import EquiformerV2
from potentials.models.facet import Facet


def _egnn(cutoff: float):
    return EGNN(cutoff=cutoff, avg_num_neighbors=10.0, channels=16, num_layers=2, num_basis=6)


def _facet(cutoff: float):
    # lmax 2 exercises every tensor-product path kind; the sphere grid at its default resolution (8 rings)
    return Facet(cutoff=cutoff, avg_num_neighbors=10.0, channels=8, lmax=2, num_layers=3, n_knots=8)


def _equiformer_v2(cutoff: float):
    # S² grids finer than the defaults so that their quadrature error (the model's only departure from exact
    # equivariance) sits below the suite's 1e-9 energy tolerance; tests/models/test_equiformer_grid.py covers defaults
    return EquiformerV2(cutoff=cutoff, avg_num_neighbors=10.0, num_layers=2, lmax=2, mmax=1, channels=8,
                        attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4, attn_value_channels=4,
                        ffn_hidden_channels=8, edge_channels=8, num_basis=8, grid_resolution=[20, 40],
                        edge_grid_resolution=[3, 24])


MODELS = {
    "egnn": _egnn,
    "facet": _facet,
    "equiformer_v2": _equiformer_v2,
}
