"""Small float64 instances of every model family, for the contract suite (tests/test_model_contract.py).

Each entry maps a name to a factory ``(cutoff) -> nn.Module`` following the model contract.
"""

from __future__ import annotations

from potentials.models.egnn import EGNN


def _egnn(cutoff: float):
    return EGNN(cutoff=cutoff, avg_num_neighbors=10.0, channels=16, num_layers=2, num_basis=6)


MODELS = {
    "egnn": _egnn,
}
