"""Small float64 instances of every model family, for the contract suite (tests/test_model_contract.py) and the
model-file tests (tests/test_export.py).

``CONFIGS`` maps a name to the family's Hydra config without its cutoff; ``MODELS`` maps the same name to a
factory ``(cutoff) -> EnergyModel`` built from that config.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import get_class

from potentials.models.base import EnergyModel

CONFIGS: dict[str, dict[str, Any]] = {
    "egnn": {"_target_": "potentials.models.egnn.EGNN", "avg_num_neighbors": 10.0, "channels": 16,
             "num_layers": 2, "num_basis": 6},
    # the paper's coordinate updates; three layers, so that two update the edge vectors (by up to 0.4 Å in the
    # contract's bulk cell, with the weights of coords_at_full_scale)
    "egnn_coords": {"_target_": "potentials.models.egnn.EGNN", "avg_num_neighbors": 3.0, "channels": 16,
                    "num_layers": 3, "num_basis": 6, "coord_updates": True},
    # lmax 2 exercises every tensor-product path kind; the sphere grid at its default resolution (8 rings)
    "facet": {"_target_": "potentials.models.facet.Facet", "avg_num_neighbors": 10.0, "channels": 8, "lmax": 2,
              "num_layers": 3, "n_knots": 8},
    # S² grids finer than the defaults so that their quadrature error (the model's only departure from exact
    # equivariance) sits below the suite's 1e-9 energy tolerance; tests/models/test_equiformer_grid.py covers defaults
    "equiformer_v2": {"_target_": "potentials.models.equiformer.EquiformerV2", "avg_num_neighbors": 10.0,
                      "num_layers": 2, "lmax": 2, "mmax": 1, "channels": 8, "attn_hidden_channels": 8,
                      "num_heads": 2, "attn_alpha_channels": 4, "attn_value_channels": 4, "ffn_hidden_channels": 8,
                      "edge_channels": 8, "num_basis": 8, "grid_resolution": [20, 40],
                      "edge_grid_resolution": [3, 24]},
}


def config(name: str, cutoff: float) -> dict[str, Any]:
    """The Hydra config of family ``name`` with ``cutoff`` (Å), as training would export it."""
    return {**CONFIGS[name], "cutoff": cutoff}


def _factory(name: str):
    def make(cutoff: float) -> EnergyModel:
        kwargs = config(name, cutoff)
        model = get_class(kwargs.pop("_target_"))(**kwargs)
        if name == "egnn_coords":
            coords_at_full_scale(model)
        return model

    return make


def coords_at_full_scale(model: EnergyModel) -> EnergyModel:
    """Give EGNN's coordinate updates weights that move atoms by tenths of an Å: they start near zero (atoms barely
    move), which would let the contract suite pass with the updates wrong."""
    with torch.no_grad():
        for layer in model.layers:
            if layer.coord_mlp is not None:
                torch.nn.init.xavier_uniform_(layer.coord_mlp[-1].weight, gain=3.0)
    return model


MODELS = {name: _factory(name) for name in CONFIGS}
