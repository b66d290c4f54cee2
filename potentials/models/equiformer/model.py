"""EquiformerV2 (Liao, Wood, Das & Smidt, 2023): a Transformer on SO(3) irreps with eSCN SO(2) convolutions.

Node features x [N, (lmax+1)², C] hold real spherical-harmonic coefficients per channel (layout: ``so3``).  The
forward pass:

1. per edge j → i: edge vector r_ij, length r, Gaussian radial basis, envelope u(r), and the rotation into the edge
   frame (computed once, used by every layer);
2. x ← element embedding at l = 0 + edge-degree embedding Σ_j u·w_l(r, z_i, z_j)·Y_l(r̂_ij) / ⟨n⟩;
3. ``num_layers`` blocks: x ← x + Attention(Norm(x)); x ← x + FFN_S²(Norm(x))  (pre-norm, optional stochastic depth);
4. final norm; per-atom energy from the l = 0 channels by an MLP — [N].

Exactness.  Every step is exactly equivariant except the two S² grid non-linearities (the separable S² activation
in the attention and the grid MLP of the FFN); their quadrature error is controlled by the grid resolutions (see
``grid`` for measurements), whose defaults keep the force and stress rotation error of the freshly initialised
model below 1e-4 relative.  ``use_gate_act=True, use_grid_mlp=False`` replaces both by gates: no grid, exact.

Smoothness.  The energy depends on geometry only through ``edge_vec``; every edge enters multiplied by the envelope
u(r) (edge-degree embedding, attention weights and messages: see ``attention``), so energies and forces go
continuously to the no-edge values as r → cutoff.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from potentials import accel
from potentials.models.base import EnergyModel
from potentials.models.equiformer.attention import EdgeData, EdgeDegreeEmbedding, SO2GraphAttention
from potentials.models.equiformer.grid import S2Grid
from potentials.models.equiformer.layers import (
    EquivariantLayerNorm,
    FeedForwardGate,
    FeedForwardS2,
    GraphDropPath,
)
from potentials.models.equiformer.so3 import EdgeRotation, num_coefficients
from potentials.nn.radial import GaussianBasis, PolynomialEnvelope

NUM_ELEMENTS = 119


def default_node_grid(lmax: int) -> tuple[int, int]:
    """Default (res_beta, res_alpha) of the node-feature S² grid (feed-forward networks).

    [4(lmax+1), 8(lmax+1)] up to lmax = 2 and [6(lmax+1), 12(lmax+1)] above: the finer grid keeps the rotation
    error of forces and stress below 1e-4 at lmax 3 and 4, where [4(lmax+1), …] gave up to 2.5e-4 (see ``grid``).
    """
    factor = 4 if lmax <= 2 else 6
    return factor * (lmax + 1), 2 * factor * (lmax + 1)


def default_edge_grid(lmax: int, mmax: int) -> tuple[int, int]:
    """Default (res_beta, res_alpha) of the edge-frame S² grid (attention activation).

    res_beta = lmax + 1 (Gauss–Legendre nodes: the least that is exact, and in the edge frame β needs no more, since
    rotations about the edge only shift α).  res_alpha = 4·mmax + 6 up to lmax 2 and 8·mmax + 8 above: at lmax 2,
    mmax 2 the 14 angles give a trained model the force rotation error of 24 (8e-5, the node grid's; 5e-7 against
    2e-7 at initialisation) for 40 % fewer grid points, while at lmax 3 14 angles gave 3e-4 (see ``grid``).
    """
    return lmax + 1, (4 * mmax + 6 if lmax <= 2 else 8 * mmax + 8)


def _resolution(value: int | Sequence[int] | None, default: tuple[int, int], lmax: int, mmax: int, what: str
                ) -> tuple[int, int]:
    if value is None:
        return default
    res = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(res) != 2 or res[0] < lmax + 1 or res[1] < 2 * mmax + 1:
        raise ValueError(
            f"{what}={list(res)} is too coarse for lmax={lmax}, mmax={mmax}: give [res_beta, res_alpha] with "
            f"res_beta >= {lmax + 1} and res_alpha >= {2 * mmax + 1}"
        )
    return res


class TransformerBlock(nn.Module):
    """x ← x + Attention(Norm₁(x));  x ← x + FFN_S²(Norm₂(x)), with optional stochastic depth on both branches."""

    def __init__(self, attention: SO2GraphAttention, ffn: nn.Module, lmax: int, channels: int,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm_1 = EquivariantLayerNorm(lmax, channels)
        self.attention = attention
        self.norm_2 = EquivariantLayerNorm(lmax, channels)
        self.ffn = ffn
        self.drop_path = GraphDropPath(drop_path)

    def forward(self, x: torch.Tensor, z: torch.Tensor, edge: EdgeData, batch: torch.Tensor,
                num_graphs: int) -> torch.Tensor:
        """x [N, (lmax+1)², C] → same shape."""
        x = x + self.drop_path(self.attention(self.norm_1(x), z, edge), batch, num_graphs)
        return x + self.drop_path(self.ffn(self.norm_2(x)), batch, num_graphs)


class EquiformerV2(EnergyModel):
    """EquiformerV2 energy model: ``forward(graph)`` → per-atom energies [N] (model units).

    Args:
        cutoff: neighbour radius, Å.
        avg_num_neighbors: average neighbour count of the training set (normalises the edge-degree embedding).
        num_layers: Transformer blocks.
        lmax, mmax: maximum degree of the features and maximum order kept in the edge frame.
        channels: channels C per coefficient ("sphere channels").
        attn_hidden_channels: channels after the first SO(2) convolution of the attention.
        num_heads, attn_alpha_channels, attn_value_channels: attention heads, logit features and value channels per
            head.
        ffn_hidden_channels: hidden channels of the feed-forward S² networks (and of the energy MLP).
        edge_channels: hidden width of the radial MLPs (and of the element embeddings appended to the radial basis).
        num_basis: Gaussians of the radial basis, centred evenly on [0, cutoff].
        basis_width: Gaussian width in units of the centre spacing.
        envelope_p: exponent of the polynomial cutoff envelope.
        grid_resolution: [res_beta, res_alpha] of the node-feature S² grid (FFN); default
            ``default_node_grid(lmax)``.
        edge_grid_resolution: [res_beta, res_alpha] of the edge-frame S² grid (attention activation); default
            ``default_edge_grid(lmax, mmax)``.
        use_attn_renorm: LayerNorm on the attention logit features (the paper's re-normalisation).
        alpha_drop: dropout rate on attention weights (training only).
        drop_path: stochastic-depth rate per block (training only).
        use_gate_act: gate activation instead of the separable S² activation in the attention (and in the
            feed-forward networks unless ``use_grid_mlp``); the paper's flag.
        use_grid_mlp: feed-forward networks with an MLP on the S² grid (the paper's default); otherwise a gate
            (``use_gate_act``) or the separable S² activation.  ``use_gate_act=True, use_grid_mlp=False`` uses no
            grid at all: exactly equivariant and cheapest.
        direct_forces: add a direct force head.  **Non-conservative**: the forces are read from the l = 1 output of
            an extra attention layer, not −∂E/∂r; ``forward`` then returns ``{"node_energy": [N], "forces": [N, 3]}``
            (forces in the same model units as the energy per Å; ``Potential`` multiplies them by its scale).
    """

    def __init__(
        self,
        *,
        cutoff: float,
        avg_num_neighbors: float = 1.0,
        num_layers: int = 4,
        lmax: int = 3,
        mmax: int = 2,
        channels: int = 48,
        attn_hidden_channels: int = 32,
        num_heads: int = 4,
        attn_alpha_channels: int = 16,
        attn_value_channels: int = 8,
        ffn_hidden_channels: int = 64,
        edge_channels: int = 32,
        num_basis: int = 32,
        basis_width: float = 2.0,
        envelope_p: int = 6,
        grid_resolution: int | Sequence[int] | None = None,
        edge_grid_resolution: int | Sequence[int] | None = None,
        use_attn_renorm: bool = True,
        alpha_drop: float = 0.0,
        drop_path: float = 0.0,
        use_gate_act: bool = False,
        use_grid_mlp: bool = True,
        direct_forces: bool = False,
    ) -> None:
        super().__init__(cutoff)
        self.lmax, self.mmax = int(lmax), int(mmax)
        self.channels, self.direct_forces = int(channels), bool(direct_forces)
        self.rotation = EdgeRotation(lmax, mmax)
        layout = self.rotation.layout
        self.node_grid = self.edge_grid = None
        if use_grid_mlp or not use_gate_act:
            node_res = _resolution(grid_resolution, default_node_grid(lmax), lmax, lmax, "grid_resolution")
            self.node_grid = S2Grid(lmax, torch.arange(num_coefficients(lmax)), *node_res)
        if not use_gate_act:
            edge_res = _resolution(edge_grid_resolution, default_edge_grid(lmax, mmax), lmax, mmax,
                                   "edge_grid_resolution")
            self.edge_grid = S2Grid(lmax, layout.full_index, *edge_res)
        spacing = self.cutoff / max(num_basis - 1, 1)
        self.basis = GaussianBasis(cutoff, num_basis, width=basis_width * spacing)
        self.envelope = PolynomialEnvelope(cutoff, envelope_p)
        self.embedding = nn.Embedding(NUM_ELEMENTS, channels)
        radial_sizes = [num_basis, edge_channels, edge_channels]
        self.edge_degree = EdgeDegreeEmbedding(lmax, channels, radial_sizes, NUM_ELEMENTS, avg_num_neighbors)

        def attention(out_channels: int, drop: float) -> SO2GraphAttention:
            return SO2GraphAttention(
                layout, self.edge_grid, channels, attn_hidden_channels, num_heads, attn_alpha_channels,
                attn_value_channels, out_channels, radial_sizes, NUM_ELEMENTS, use_attn_renorm, drop, use_gate_act,
            )

        def ffn() -> nn.Module:
            if use_gate_act and not use_grid_mlp:
                return FeedForwardGate(lmax, channels, ffn_hidden_channels, channels)
            return FeedForwardS2(lmax, channels, ffn_hidden_channels, channels, self.node_grid, use_grid_mlp)

        self.blocks = nn.ModuleList(
            TransformerBlock(attention(channels, alpha_drop), ffn(), lmax, channels, drop_path)
            for _ in range(num_layers)
        )
        self.norm = EquivariantLayerNorm(lmax, channels)
        # The paper's energy block is a feed-forward S² network whose l = 0 output depends only on the l = 0 input
        # through Linear → SiLU → Linear; that is all it computes here (same function, no unused weights).
        self.energy_head = nn.Sequential(
            nn.Linear(channels, ffn_hidden_channels), nn.SiLU(), nn.Linear(ffn_hidden_channels, 1)
        )
        self.force_head = attention(1, 0.0) if direct_forces else None

    def resolved_config(self) -> dict:
        """The grid resolutions in use, for model files: a file then keeps its grids if the defaults change."""
        def res(grid: S2Grid | None) -> list[int] | None:
            return None if grid is None else [grid.res_beta, grid.res_alpha]

        return {"grid_resolution": res(self.node_grid), "edge_grid_resolution": res(self.edge_grid)}

    @classmethod
    def upgrade_config(cls, config: dict[str, Any], format_version: int) -> dict[str, Any]:
        """Format 1 recorded no grids: give such a file the grids its version used by default."""
        config = dict(config)
        if format_version < 2:
            lmax, mmax = int(config.get("lmax", 3)), int(config.get("mmax", 2))
            if config.get("grid_resolution") is None and lmax >= 3:  # node grids were 4(lmax+1) x 8(lmax+1)
                config["grid_resolution"] = [4 * (lmax + 1), 8 * (lmax + 1)]
            if config.get("edge_grid_resolution") is None:  # edge grids were (lmax+1) x (8·mmax+8) for all lmax
                config["edge_grid_resolution"] = [lmax + 1, 8 * mmax + 8]
        return config

    def edge_data(self, edge_index: torch.Tensor, edge_vec: torch.Tensor, num_nodes: int) -> EdgeData:
        """Per-edge quantities shared by all layers (zero-length edges are guarded: r = 0, frame = identity)."""
        r2 = (edge_vec * edge_vec).sum(-1)
        ok = r2 > 1e-24
        r = torch.where(ok, torch.sqrt(torch.where(ok, r2, torch.ones_like(r2))), torch.zeros_like(r2))
        return EdgeData(
            src=edge_index[0], dst=edge_index[1], rot=self.rotation(edge_vec), radial=self.basis(r),
            envelope=self.envelope(r), num_nodes=num_nodes,
        )

    def forward(self, graph) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-atom energies [N] from ``z``, ``edge_index``, ``edge_vec`` (Å) and ``batch``; see ``direct_forces``."""
        z, edge_vec = graph.z, graph.edge_vec
        n = z.shape[0]
        batch = getattr(graph, "batch", None)
        if batch is None:
            batch = torch.zeros_like(z)
        edge = self.edge_data(graph.edge_index, edge_vec, n)
        x0 = self.embedding(z).unsqueeze(1)
        x = torch.cat([x0, x0.new_zeros(n, num_coefficients(self.lmax) - 1, self.channels)], dim=1)
        x = accel.mark_steps(x + self.edge_degree(z, edge))  # node-wise steps from here on
        num_graphs = 1
        if self.training and any(b.drop_path.p > 0 for b in self.blocks):
            num_graphs = int(batch.max()) + 1 if n else 0
        for block in self.blocks:
            x = block(x, z, edge, batch, num_graphs)
        x = self.norm(x)
        node_energy = self.energy_head(x[:, 0]).squeeze(-1)
        if self.force_head is None:
            return node_energy
        forces = self.force_head(x, z, edge)[:, 1:4, 0]  # the l = 1 block is Cartesian (x, y, z)
        return {"node_energy": node_energy, "forces": forces}
