"""One Facet interaction: equivariant convolution, aggregation, then a sphere-grid (or gate) MLP.

    x_in [N, D_in, C] ──pre-linear──▶ gather x_j ──⊗ Y(r̂_ij), w(r_ij)──▶ Σ_j / ⟨n⟩ ──post-linear──▶ u [N, D_out, H]
    x_out = self-connection(x_in) + out-linear(σ(u))

σ is the sphere-grid MLP (:class:`~potentials.models.facet.grid.SphereGridActivation`) or a gate
(:class:`~potentials.nn.irreps.GateActivation`, whose gate scalars the post-linear also produces).  The post- and
out-linears are the first and last layers of the grid MLP.  When only scalars are produced (the last layer,
lmax_out = 0) σ is SiLU for both: a function that is constant over the sphere needs no grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from potentials.models.facet.grid import SphereGridActivation
from potentials.models.facet.tensor_product import EdgeTensorProduct
from potentials.nn.irreps import DegreeLinear, GateActivation, degree_slice, num_coefficients


class Interaction(nn.Module):
    """Message passing layer on features [N, (lmax_in+1)², C] → [N, (lmax_out+1)², C].

    Args:
        lmax_in: highest degree of the input features (0 for the first layer: element embedding only).
        lmax_out: highest degree of the output features.
        lmax_sh: highest degree of the edge spherical harmonics.
        channels: C.
        hidden: H, channels of the nonlinearity (grid MLP width or gated features).
        avg_num_neighbors: divides the sum over neighbours.
        self_interaction: ``"grid"`` (sphere-grid MLP) or ``"gate"``.
        grid_resolution: latitude rings of the sphere grid (None: the default for lmax_out).
        grid_depth: nonlinearities applied on the grid.
    """

    def __init__(
        self,
        *,
        lmax_in: int,
        lmax_out: int,
        lmax_sh: int,
        channels: int,
        hidden: int,
        avg_num_neighbors: float,
        self_interaction: str = "grid",
        grid_resolution: int | None = None,
        grid_depth: int = 1,
    ) -> None:
        super().__init__()
        if self_interaction not in ("grid", "gate"):
            raise ValueError(f"self_interaction must be 'grid' or 'gate', got {self_interaction!r}")
        self.lmax_in, self.lmax_out = int(lmax_in), int(lmax_out)
        self.norm = 1.0 / float(avg_num_neighbors)
        self.pre = (DegreeLinear(lmax_in, channels, channels, bias=False, weight_layout="in_out")
                    if lmax_in > 0 else None)
        self.tp = EdgeTensorProduct(lmax_in, lmax_sh, lmax_out)
        self.use_gate = self_interaction == "gate" and lmax_out > 0
        # post-linear per path: C → H (+ the gate scalars on l3 = 0 paths); paths into the same l3 are summed
        gate_width = hidden * (1 + lmax_out) if self.use_gate else hidden
        self.post = nn.ParameterList()
        for *_, l3 in self.tp.paths:
            count = sum(1 for p in self.tp.paths if p[2] == l3)
            width = gate_width if l3 == 0 else hidden
            self.post.append(nn.Parameter(torch.randn(channels, width) / math.sqrt(count * channels)))
        self.post_bias = nn.Parameter(torch.zeros(gate_width))
        if lmax_out == 0:
            self.act: nn.Module = nn.SiLU()
        elif self.use_gate:
            self.act = GateActivation(lmax_out)
        else:
            self.act = SphereGridActivation(lmax_out, hidden, grid_resolution, grid_depth)
        self.out = DegreeLinear(lmax_out, hidden, channels, weight_layout="in_out")
        self.self_connection = DegreeLinear(min(lmax_in, lmax_out), channels, channels, bias=False,
                                            weight_layout="in_out")
        self.hidden = int(hidden)

    @property
    def num_paths(self) -> int:
        return self.tp.num_paths

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, sh: list[torch.Tensor],
                weights: list[torch.Tensor]) -> torch.Tensor:
        """One interaction.

        Args:
            x: [N, D_in, C] node features.
            src: [E] source (neighbour j) of each edge; dst: [E] target (centre i).
            sh: spherical harmonics of edge_vec per degree, [E, 2l+1] each (contiguous).
            weights: per tensor-product path, [E, C] radial weights.

        Returns:
            [N, D_out, C] new node features.
        """
        n = x.shape[0]
        h = self.pre(x) if self.pre is not None else x
        x_j = [h[:, 0].index_select(0, src)]
        x_j += [h[:, degree_slice(l)].contiguous().index_select(0, src) for l in range(1, self.lmax_in + 1)]
        messages = self.tp(x_j, sh, weights)
        parts: list[torch.Tensor | None] = [None] * (self.lmax_out + 1)
        for (_, _, l3), msg, weight in zip(self.tp.paths, messages, self.post, strict=True):
            agg = x.new_zeros(n, msg.shape[1], msg.shape[2]).index_add_(0, dst, msg)
            term = agg @ (weight * self.norm)
            parts[l3] = term if parts[l3] is None else parts[l3] + term
        parts[0] = parts[0] + self.post_bias
        if self.use_gate:
            gates = parts[0][:, 0, self.hidden:]
            parts[0] = parts[0][..., :self.hidden]
            y = self.act(gates, torch.cat(parts, dim=1))
        else:
            y = self.act(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        out = self.out(y)
        d_sc = num_coefficients(min(self.lmax_in, self.lmax_out))
        sc = self.self_connection(x[:, :d_sc])
        if d_sc == out.shape[1]:
            return out + sc
        return torch.cat([out[:, :d_sc] + sc, out[:, d_sc:]], dim=1)
