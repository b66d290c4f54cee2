"""EGNN (Satorras, Hoogeboom & Welling, 2021) as an invariant energy model.

Each layer updates invariant node features from messages that see the two atoms' features and the distance:

    m_ij = φ_e(h_i, h_j, ρ(|r_ij|)) · u(|r_ij|)          ρ: Bessel basis,  u: smooth cutoff envelope
    m_ij ← m_ij · sigmoid(φ_att(m_ij))                    (the paper's edge inference gate)
    h_i ← h_i + φ_h(h_i, Σ_j m_ij / ⟨n⟩)

Coordinates are not updated (the energy path only needs invariant features), so the energy depends on geometry only
through |r_ij| and is smooth at the cutoff: every message carries the envelope u, whose value and first two
derivatives vanish there.  A per-atom energy is read out from the final features.
"""

from __future__ import annotations

import torch
from torch import nn

from potentials.models.base import EnergyModel
from potentials.nn.mlp import mlp
from potentials.nn.radial import BesselBasis, PolynomialEnvelope


class EGNNLayer(nn.Module):
    """One invariant EGNN message-passing layer on features [N, C]."""

    def __init__(self, channels: int, num_basis: int, avg_num_neighbors: float) -> None:
        super().__init__()
        # φ_e's first layer acts on [h_i, h_j, ρ]; split as W_i h_i + W_j h_j + W_ρ ρ so the two C×C products run on
        # nodes (N rows) and are gathered, instead of on edges (E ≈ 40 N rows)
        self.lin_i = nn.Linear(channels, channels, bias=True)
        self.lin_j = nn.Linear(channels, channels, bias=False)
        self.lin_rad = nn.Linear(num_basis, channels, bias=False)
        self.edge_mlp = nn.Sequential(nn.SiLU(), nn.Linear(channels, channels), nn.SiLU())
        self.gate = nn.Sequential(nn.Linear(channels, 1), nn.Sigmoid())
        self.node_mlp = mlp([2 * channels, channels, channels])
        self.norm = 1.0 / float(avg_num_neighbors)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, radial: torch.Tensor, envelope: torch.Tensor
                ) -> torch.Tensor:
        """h: [N, C]; edge_index [2, E] (j, i); radial [E, num_basis]; envelope [E] → new h [N, C]."""
        j, i = edge_index[0], edge_index[1]
        # index_select, not h[i]: its backward is an index_add; that of h[i] an index_put with accumulation, which
        # on the CPU is several times slower
        pre = self.lin_i(h).index_select(0, i) + self.lin_j(h).index_select(0, j) + self.lin_rad(radial)
        m = self.edge_mlp(pre) * envelope.unsqueeze(-1)
        m = m * self.gate(m)
        agg = torch.zeros_like(h).index_add(0, i, m) * self.norm
        return h + self.node_mlp(torch.cat([h, agg], dim=-1))


class EGNN(EnergyModel):
    """Invariant EGNN energy model: ``forward(graph)`` → per-atom energies [N] (model units).

    Args:
        cutoff: neighbour radius, Å.
        avg_num_neighbors: average neighbour count of the training set (normalises message sums).
        channels: width of node features.
        num_layers: message-passing layers.
        num_basis: Bessel radial functions.
        envelope_p: exponent of the polynomial cutoff envelope.
    """

    def __init__(
        self,
        *,
        cutoff: float,
        avg_num_neighbors: float = 1.0,
        channels: int = 64,
        num_layers: int = 4,
        num_basis: int = 8,
        envelope_p: int = 6,
    ) -> None:
        super().__init__(cutoff)
        self.embedding = nn.Embedding(119, channels)
        self.basis = BesselBasis(cutoff, num_basis)
        self.envelope = PolynomialEnvelope(cutoff, envelope_p)
        self.layers = nn.ModuleList(
            EGNNLayer(channels, num_basis, avg_num_neighbors) for _ in range(num_layers)
        )
        self.readout = mlp([channels, channels // 2, 1])

    def forward(self, graph) -> torch.Tensor:
        """Per-atom energies [N] from ``z``, ``edge_index`` and ``edge_vec`` (Å)."""
        r = torch.linalg.vector_norm(graph.edge_vec, dim=-1)
        radial = self.basis(r)
        env = self.envelope(r)
        h = self.embedding(graph.z)
        for layer in self.layers:
            h = layer(h, graph.edge_index, radial, env)
        return self.readout(h).squeeze(-1)
