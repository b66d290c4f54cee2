"""Facet (Miklaucic et al., 2025): a steerable message-passing potential with spline radial weights and a
sphere-grid MLP as its equivariant nonlinearity.

Architecture (NequIP/SevenNet-style message passing):

* element embedding: ``x⁰ = Embedding(z)`` — C scalar channels;
* ``num_layers`` interactions (:class:`~potentials.models.facet.conv.Interaction`): channel-wise tensor product
  of neighbour features with the spherical harmonics of ``edge_vec`` (l ≤ lmax), weighted per edge, path and
  channel by radial functions of |r_ij|; sum over neighbours / ``avg_num_neighbors``; a linear self-connection
  plus a pointwise nonlinearity.  The last interaction only produces scalars (all the readout needs);
* per-atom energy: a small MLP on the final scalars.

The paper's two ideas are switches, so each can be compared against the standard component it replaces:

* ``radial="spline"``: all radial weights of all layers are cubic B-splines of the distance with learnable
  coefficients on a uniform knot grid (:mod:`potentials.nn.splines`) — one knot-interval lookup per edge, then
  a gather of four coefficient rows per edge and path.  ``radial="mlp"``: NequIP's radial MLP on a Bessel basis
  times a polynomial envelope, one per layer.
* ``self_interaction="grid"``: the node features are sampled on a sphere grid, an MLP acts across channels at
  every point, and the result is projected back (:mod:`potentials.models.facet.grid`); equivariant up to a
  quadrature error that the grid resolution controls (table in that module).  ``self_interaction="gate"``:
  the e3nn-style gate (SiLU on scalars, sigmoid-gated l > 0), exactly equivariant.

Both radial variants reach zero with two vanishing derivatives at the cutoff, so energies and forces are
continuous as neighbours cross it.

Choices of this implementation: one channel count C for every l (the published Facet-S uses 128/64/32 for
l = 0/1/2); only natural-parity features (0e, 1o, 2e, …), so the model is O(3)-invariant and the grid's inversion
symmetry keeps parity exact; a Gauss–Legendre sphere grid rather than a SOFT grid (about half the points for the
same exactness); per-degree linear maps as the first and last layers of the grid MLP.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from potentials.models.base import EnergyModel
from potentials.models.facet.conv import Interaction
from potentials.models.facet.radial import BesselMLPRadial, SplineRadial
from potentials.nn.mlp import mlp

NUM_ELEMENTS = 119


class Facet(EnergyModel):
    """Facet energy model: ``forward(graph)`` → per-atom energies [N] (model units).

    Args:
        cutoff: neighbour radius, Å.
        avg_num_neighbors: average neighbour count of the training set (normalises message sums).
        channels: C, channels per spherical-harmonic component (the same for every l).
        lmax: highest degree of node features and edge spherical harmonics.
        num_layers: interactions (≥ 1); the last one outputs scalars only.
        radial: ``"spline"`` (cubic B-splines) or ``"mlp"`` (Bessel basis + MLP + envelope).
        n_knots: knot intervals of the splines on [0, cutoff] (knot spacing cutoff / n_knots).
        num_bessel: Bessel functions of the ``"mlp"`` radial variant.
        radial_mlp_hidden: hidden widths of the ``"mlp"`` radial variant.
        self_interaction: ``"grid"`` (sphere-grid MLP) or ``"gate"``.
        grid_resolution: latitude rings of the sphere grid (2·resolution² points); None: 2·lmax + 4, whose
            quadrature error is tabulated in :mod:`potentials.models.facet.grid`.
        grid_hidden: channels of the grid MLP (defaults to ``channels``).
        grid_depth: nonlinearities applied on the grid per interaction.
        readout_hidden: hidden width of the per-atom energy MLP (defaults to ``channels // 2``).
    """

    def __init__(
        self,
        *,
        cutoff: float,
        avg_num_neighbors: float = 1.0,
        channels: int = 64,
        lmax: int = 1,
        num_layers: int = 2,
        radial: str = "spline",
        n_knots: int = 16,
        num_bessel: int = 8,
        radial_mlp_hidden: tuple[int, ...] | list[int] = (64, 64),
        self_interaction: str = "grid",
        grid_resolution: int | None = None,
        grid_hidden: int | None = None,
        grid_depth: int = 1,
        readout_hidden: int | None = None,
    ) -> None:
        super().__init__(cutoff)
        if num_layers < 1:
            raise ValueError(f"Facet needs num_layers >= 1, got {num_layers}")
        if not 0 <= lmax <= 3:
            raise ValueError(f"Facet supports lmax 0..3, got {lmax}")
        if radial not in ("spline", "mlp"):
            raise ValueError(f"radial must be 'spline' or 'mlp', got {radial!r}")
        if avg_num_neighbors <= 0:
            raise ValueError(f"avg_num_neighbors must be positive, got {avg_num_neighbors}")
        self.lmax = int(lmax)
        self.embedding = nn.Embedding(NUM_ELEMENTS, channels)
        self.layers = nn.ModuleList()
        for k in range(num_layers):
            self.layers.append(
                Interaction(
                    lmax_in=0 if k == 0 else lmax,
                    lmax_out=lmax if k < num_layers - 1 else 0,
                    lmax_sh=lmax,
                    channels=channels,
                    hidden=grid_hidden or channels,
                    avg_num_neighbors=avg_num_neighbors,
                    self_interaction=self_interaction,
                    grid_resolution=grid_resolution,
                    grid_depth=grid_depth,
                )
            )
        sizes = [(layer.num_paths, channels) for layer in self.layers]
        if radial == "spline":
            self.radial: nn.Module = SplineRadial(cutoff, n_knots, sizes)
        else:
            self.radial = BesselMLPRadial(cutoff, sizes, num_bessel, tuple(radial_mlp_hidden))
        self.readout = mlp([channels, readout_hidden or max(channels // 2, 1), 1])

    def forward(self, graph) -> torch.Tensor:
        """Per-atom energies [N] from ``z`` [N], ``edge_index`` [2, E] (j → i) and ``edge_vec`` [E, 3] (Å)."""
        src, dst = graph.edge_index[0], graph.edge_index[1]
        edge_vec = graph.edge_vec
        r = torch.linalg.vector_norm(edge_vec, dim=-1)
        sh_all = o3.spherical_harmonics(list(range(self.lmax + 1)), edge_vec, normalize=True,
                                        normalization="component")
        sh = [sh_all[:, l * l:(l + 1) * (l + 1)].contiguous() for l in range(self.lmax + 1)]
        weights = self.radial(r)
        x = self.embedding(graph.z).unsqueeze(1)  # [N, 1, C]
        for layer, w in zip(self.layers, weights, strict=True):
            x = layer(x, src, dst, sh, w)
        return self.readout(x[:, 0]).squeeze(-1)
