"""SO(2) convolution of eSCN: linear maps in the edge frame that commute with rotations about the edge axis.

In the edge frame (polar axis y along the edge) a roll by θ turns each pair (x_{+m}, x_{−m}) of a degree by the angle
mθ and leaves m = 0 alone.  The most general linear map commuting with every roll, between the kept coefficients
(|m| ≤ mmax, layout :class:`~potentials.models.equiformer.so3.EdgeLayout`) is block-diagonal in |m|:

* m = 0: any linear map of the (lmax+1)·C_in coefficients (bias allowed: m = 0 is roll-invariant);
* m > 0: y_{+m} = W1 x_{+m} − W2 x_{−m},  y_{−m} = W2 x_{+m} + W1 x_{−m}, i.e. the block [[W1, −W2], [W2, W1]]
  acting on (+m, −m) — multiplication by the complex number W1 + iW2 — with W1, W2 mixing degrees and channels.

The distance dependence enters as in EquiformerV2: a radial MLP of invariant edge features gives one weight per
(order, degree, input channel), shared by +m and −m, that multiplies the input before the linear map.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from potentials.models.equiformer.layers import RadialMLP
from potentials.models.equiformer.so3 import EdgeLayout


class SO2Convolution(nn.Module):
    """Edge-frame features [E, R, C_in] → [E, R, C_out] (plus optional extra invariant outputs).

    Args:
        layout: the kept coefficients in the edge frame.
        in_channels, out_channels: channels C_in, C_out.
        extra_m0_channels: additional invariant outputs [E, extra] from the m = 0 map (attention logits, gates).
        radial_sizes: widths [F, hidden, …] of the radial MLP taking invariant edge features [E, F]; ``None`` for a
            distance-independent map.
    """

    def __init__(
        self,
        layout: EdgeLayout,
        in_channels: int,
        out_channels: int,
        extra_m0_channels: int = 0,
        radial_sizes: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.extra = int(extra_m0_channels)
        sizes = layout.m_sizes
        self.fc_m0 = nn.Linear(sizes[0] * in_channels, sizes[0] * out_channels + self.extra)
        self.fc_m = nn.ModuleList()
        for k in range(1, layout.mmax + 1):
            fc = nn.Linear(sizes[k] * in_channels, 2 * sizes[k] * out_channels, bias=False)
            with torch.no_grad():
                fc.weight.mul_(1.0 / math.sqrt(2.0))  # two maps (W1, W2) feed each output
            self.fc_m.append(fc)
        self.radial = None
        if radial_sizes is not None:
            self.radial = RadialMLP([*radial_sizes, sum(sizes) * in_channels])

    def forward(self, x: torch.Tensor, edge_features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [E, R, C_in]; edge_features [E, F] (needed iff built with ``radial_sizes``).

        Returns:
            y [E, R, C_out] and the extra invariant outputs [E, extra_m0_channels].
        """
        n_edges, c_in, c_out = x.shape[0], self.in_channels, self.out_channels
        sizes = self.layout.m_sizes
        # split (not slicing) so that the backward pass is a single concatenation
        blocks = x.split([sizes[0]] + [2 * s for s in sizes[1:]], dim=1)
        weights = None
        if self.radial is not None:
            weights = self.radial(edge_features).split([s * c_in for s in sizes], dim=1)
        x0 = blocks[0].reshape(n_edges, sizes[0] * c_in)
        if weights is not None:
            x0 = x0 * weights[0]
        y0, extra = self.fc_m0(x0).split([sizes[0] * c_out, self.extra], dim=1)
        outs = [y0.reshape(n_edges, sizes[0], c_out)]
        for k, fc in enumerate(self.fc_m, start=1):
            xk = blocks[k].reshape(n_edges, 2, sizes[k] * c_in)  # (+k, −k)
            if weights is not None:
                xk = xk * weights[k].unsqueeze(1)
            # one matrix [[W1, −W2], [W2, W1]] on (x₊, x₋): the outputs land in layout order, no recombination
            w1, w2 = fc.weight.split(sizes[k] * c_out, dim=0)
            block = torch.cat([torch.cat([w1, -w2], dim=1), torch.cat([w2, w1], dim=1)], dim=0)
            yk = nn.functional.linear(xk.reshape(n_edges, 2 * sizes[k] * c_in), block)
            outs.append(yk.reshape(n_edges, 2 * sizes[k], c_out))
        return torch.cat(outs, dim=1), extra
