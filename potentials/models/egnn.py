"""EGNN (Satorras, Hoogeboom & Welling, 2021) as an energy model, with the paper's coordinate updates as an option.

Each layer updates node features from messages that see the two atoms' features and the distance (eq. 3, 5, 6):

    m_ij = φ_e(h_i, h_j, ρ(d_ij)) · u(|r_ij|)             ρ: Bessel basis,  u: smooth cutoff envelope
    m_ij ← m_ij · sigmoid(φ_att(m_ij))                    (the paper's edge inference gate)
    h_i ← h_i + φ_h(h_i, Σ_j m_ij / ⟨n⟩)

``coord_updates`` false (the invariant model): d_ij = |r_ij| in every layer, so the energy is a function of the
distances alone.  ``coord_updates`` true adds the paper's eq. 4 after every layer but the last,

    x_i ← x_i + C Σ_j (x_i − x_j) φ_x(m_ij) u(|r_ij|),     C = 1/⟨n⟩,

carried through the edge vectors: with Δx_i that displacement, every edge becomes r_ij ← r_ij + Δx_j − Δx_i, and the
next layer's d_ij is the length of the updated vector.  The input edge vectors stay the leaves of autograd, so
forces (−∂E/∂positions) and the strain derivative (stress) are exact as for any model, and a periodic image is
right because r_ij already holds the image shift and an image moves with its atom.  ``r_ij`` in u is always the
*input* vector: an edge's every contribution — its message, its push on the coordinates, and the updated vector's
message in later layers — carries the envelope of its original length, whose value and first two derivatives
vanish at the cutoff, so the energy stays smooth when an edge leaves the neighbour list.  Rotations act on every r_ij
and Δx_i alike, so the energy stays invariant and forces equivariant.  A per-atom energy is read out from the final
features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from potentials.models.base import EnergyModel
from potentials.nn.mlp import mlp
from potentials.nn.radial import BesselBasis, PolynomialEnvelope


class EGNNLayer(nn.Module):
    """One EGNN message-passing layer on features [N, C]; with ``coords`` also the coordinate update φ_x."""

    def __init__(self, channels: int, num_basis: int, avg_num_neighbors: float, coords: bool = False) -> None:
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
        self.coord_mlp = None
        if coords:
            # φ_x; its last layer starts small (as in the paper's code) so that a new model moves atoms little
            last = nn.Linear(channels, 1, bias=False)
            nn.init.xavier_uniform_(last.weight, gain=1e-3)
            self.coord_mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), last)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, radial: torch.Tensor, envelope: torch.Tensor,
                edge_vec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h: [N, C]; edge_index [2, E] (j, i); radial [E, num_basis]; envelope [E] (of the input lengths);
        edge_vec [E, 3] (with ``coords``) → new h [N, C] and the updated edge vectors (None without ``coords``)."""
        j, i = edge_index[0], edge_index[1]
        # index_select, not h[i]: its backward is an index_add; that of h[i] an index_put with accumulation, which
        # on the CPU is several times slower
        pre = self.lin_i(h).index_select(0, i) + self.lin_j(h).index_select(0, j) + self.lin_rad(radial)
        m = self.edge_mlp(pre) * envelope.unsqueeze(-1)
        new_vec = None
        if self.coord_mlp is not None:
            # x_i − x_j = −r_ij; the push of edge (j, i) on atom i, gone with its envelope
            push = edge_vec * (self.coord_mlp(m).squeeze(-1) * envelope * -self.norm).unsqueeze(-1)
            shift = torch.zeros(h.shape[0], 3, dtype=edge_vec.dtype, device=edge_vec.device).index_add(0, i, push)
            new_vec = edge_vec + shift[j] - shift[i]
        m = m * self.gate(m)
        agg = torch.zeros_like(h).index_add(0, i, m) * self.norm
        return h + self.node_mlp(torch.cat([h, agg], dim=-1)), new_vec


class EGNN(EnergyModel):
    """EGNN energy model: ``forward(graph)`` → per-atom energies [N] (model units).

    Args:
        cutoff: neighbour radius, Å.
        avg_num_neighbors: average neighbour count of the training set (normalises message sums and the coordinate
            updates).
        channels: width of node features.
        num_layers: message-passing layers.
        num_basis: Bessel radial functions.
        envelope_p: exponent of the polynomial cutoff envelope.
        coord_updates: the paper's coordinate updates after every layer but the last (module docstring); false:
            the invariant two-body message-passing model.  Has no effect with one layer.
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
        coord_updates: bool = False,
    ) -> None:
        super().__init__(cutoff)
        self.coord_updates = bool(coord_updates)
        self.embedding = nn.Embedding(119, channels)
        self.basis = BesselBasis(cutoff, num_basis)
        self.envelope = PolynomialEnvelope(cutoff, envelope_p)
        self.layers = nn.ModuleList(
            EGNNLayer(channels, num_basis, avg_num_neighbors, coords=self.coord_updates and k < num_layers - 1)
            for k in range(num_layers)
        )
        self.readout = mlp([channels, channels // 2, 1])

    def resolved_config(self) -> dict[str, Any]:
        """Whether coordinates are updated, recorded in every model file."""
        return {"coord_updates": self.coord_updates}

    @classmethod
    def upgrade_config(cls, config: dict[str, Any], format_version: int) -> dict[str, Any]:
        """Files written before coordinate updates existed hold the invariant model."""
        return {"coord_updates": False, **config}

    def forward(self, graph) -> torch.Tensor:
        """Per-atom energies [N] from ``z``, ``edge_index`` and ``edge_vec`` (Å)."""
        vec = graph.edge_vec
        r = torch.linalg.vector_norm(vec, dim=-1)
        radial = self.basis(r)
        env = self.envelope(r)  # of the input lengths, for every layer
        h = self.embedding(graph.z)
        for layer in self.layers:
            h, new_vec = layer(h, graph.edge_index, radial, env, vec if layer.coord_mlp is not None else None)
            if new_vec is not None:
                vec = new_vec
                radial = self.basis(_length(vec))
        return self.readout(h).squeeze(-1)


def _length(vec: torch.Tensor) -> torch.Tensor:
    """|vec| [E] with a finite gradient where an updated edge vector vanishes (its basis is then the r → 0 limit)."""
    r2 = (vec * vec).sum(-1)
    ok = r2 > 1e-18
    return torch.where(ok, torch.sqrt(torch.where(ok, r2, torch.ones_like(r2))), torch.zeros_like(r2))
