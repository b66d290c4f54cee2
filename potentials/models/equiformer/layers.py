"""Node-wise layers of EquiformerV2 on features [N, (lmax+1)², C]: the equivariant layer norm, the feed-forward
networks (S² grid MLP or gate), the radial MLP, the attention activation, stochastic depth.  The degree-wise linear
map and the gate activation are the shared ones of :mod:`potentials.nn.irreps`."""

from __future__ import annotations

import torch
from torch import nn

from potentials.models.equiformer.grid import GridMLP, S2Grid, SeparableS2Activation
from potentials.nn.irreps import DegreeLinear, GateActivation, degree_index


class EquivariantLayerNorm(nn.Module):
    """EquiformerV2's separable layer norm ("layer_norm_sh").

    l = 0: an ordinary LayerNorm over channels (with affine weight and bias).  l > 0: divided by one RMS taken over
    all l > 0 coefficients and channels, each degree weighted equally (mean over its 2l+1 components, then mean over
    degrees and channels), then scaled by a learned weight per (degree, channel); no bias, no centring, so equivariant.
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.lmax, self.eps = int(lmax), float(eps)
        self.norm_l0 = nn.LayerNorm(channels, eps=eps)
        if lmax > 0:
            self.affine_weight = nn.Parameter(torch.ones(lmax, channels))
            deg = degree_index(lmax)[1:]
            self.register_buffer("weight_index", deg - 1, persistent=False)
            self.register_buffer("balance", 1.0 / ((2 * deg + 1).double() * lmax), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, (lmax+1)², C] → same shape."""
        x0 = self.norm_l0(x[:, 0]).unsqueeze(1)
        if self.lmax == 0:
            return x0
        higher = x[:, 1:]
        mean_sq = torch.einsum("nkc,k->n", higher * higher, self.balance.to(x.dtype)) / higher.shape[-1]
        scale = torch.rsqrt(mean_sq + self.eps)
        weight = self.affine_weight.index_select(0, self.weight_index)
        return torch.cat([x0, higher * scale[:, None, None] * weight], dim=1)


class FeedForwardS2(nn.Module):
    """Feed-forward S² network with separable scalars (EquiformerV2).

    h = DegreeLinear(x);  l = 0 of the result: SiLU(Linear(x_0));  l > 0: from_grid(MLP(to_grid(h))) with the grid MLP
    (``grid_mlp=True``, the paper's default) or from_grid(SiLU(to_grid(h))) (the separable S² activation);
    then DegreeLinear.
    """

    def __init__(self, lmax: int, channels: int, hidden_channels: int, out_channels: int, grid: S2Grid,
                 grid_mlp: bool = True) -> None:
        super().__init__()
        self.linear_1 = DegreeLinear(lmax, channels, hidden_channels)
        if grid_mlp:
            self.scalar_mlp = nn.Sequential(nn.Linear(channels, hidden_channels), nn.SiLU())
            self.pointwise = GridMLP(grid, hidden_channels)
        else:  # the activation applies SiLU to the scalars itself
            self.scalar_mlp = nn.Linear(channels, hidden_channels)
            self.pointwise = SeparableS2Activation(grid)
        self.linear_2 = DegreeLinear(lmax, hidden_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, (lmax+1)², C] → [N, (lmax+1)², C_out]."""
        scalars = self.scalar_mlp(x[:, 0])
        return self.linear_2(self.pointwise(scalars, self.linear_1(x)))


class FeedForwardGate(nn.Module):
    """Feed-forward network with a gate activation: DegreeLinear → gates from Linear(x_0) → DegreeLinear (exact)."""

    def __init__(self, lmax: int, channels: int, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gating = nn.Linear(channels, lmax * hidden_channels)
        self.linear_1 = DegreeLinear(lmax, channels, hidden_channels)
        self.gate = GateActivation(lmax)
        self.linear_2 = DegreeLinear(lmax, hidden_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, (lmax+1)², C] → [N, (lmax+1)², C_out]."""
        return self.linear_2(self.gate(self.gating(x[:, 0]), self.linear_1(x)))


class RadialMLP(nn.Module):
    """Invariant edge features → per-edge weights: (Linear → LayerNorm → SiLU) per hidden width, then Linear."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
            layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.SiLU()]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [E, sizes[0]] → [E, sizes[-1]]."""
        return self.net(x)


class SmoothLeakyReLU(nn.Module):
    """(1+a)/2·x + (1−a)/2·x·(2σ(x) − 1): a smooth leaky ReLU with slope a for x → −∞ (EquiformerV2 attention)."""

    def __init__(self, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.alpha = float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        return 0.5 * (1 + a) * x + 0.5 * (1 - a) * x * (2 * torch.sigmoid(x) - 1)


class GraphDropPath(nn.Module):
    """Stochastic depth per structure: in training, drops a residual branch for whole graphs with probability p."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """x [N, ...]; batch [N] graph index of each node."""
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(num_graphs, dtype=x.dtype, device=x.device) >= self.p
        mask = keep.to(x.dtype)[batch] / (1.0 - self.p)
        return x * mask.view(-1, *([1] * (x.dim() - 1)))
