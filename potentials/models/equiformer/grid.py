"""Point-wise non-linearities on the sphere: coefficients → values on a grid → non-linearity → coefficients.

A function on the sphere with real spherical-harmonic coefficients x_lm (component normalisation, polar axis y) is
sampled on a product grid (:mod:`potentials.nn.sphere_grid`): Gauss–Legendre nodes in cos β (``res_beta`` of them)
times ``res_alpha`` equally spaced angles α about the polar axis.  With ``res_beta ≥ lmax + 1`` and
``res_alpha ≥ 2·mmax + 1`` the grid integrates every product of two kept harmonics exactly, so
``from_grid(to_grid(x)) = x`` to round-off and the maps are equivariant for band-limited signals.  A non-linearity
σ(f) is not band-limited: projecting it back aliases the part of σ(f) above the grid's exactness into the kept
coefficients, so the S² activation is equivariant only up to a quadrature error that falls (roughly exponentially)
with the resolution.  It is the only approximately equivariant step of the model.

Measured rotation error (float64, relative max deviation over 3 random rotations of a rattled 4-atom CuAl cell,
2-block models at initialisation with C channels; one grid varied, the other fine).  Node grid [res_beta, 2·res_beta];
edge grid [lmax+1, res_alpha] (res_beta beyond lmax+1 changes nothing measurable for the edge grid):

=======================  =============  ============  ============
forces (stress)          lmax=2, C=16   lmax=3, C=32  lmax=4, C=32
=======================  =============  ============  ============
node res_beta = 2l+2     4e-3 (2e-3)    5e-3 (3e-3)   6e-3 (7e-3)
node res_beta = 3l+3     2e-4 (9e-5)    7e-4 (2e-4)   2e-4 (3e-4)
node res_beta = 4l+4 *   1e-5 (3e-6)    5e-5 (9e-6)   3e-5 (2e-5)
node res_beta = 5l+5     3e-7 (1e-7)    5e-6 (9e-7)   3e-6 (1e-6)
edge res_alpha = 4m+4    3e-5 (2e-5)    3e-3 (1e-3)   2e-3 (9e-4)
edge res_alpha = 6m+6    1e-7 (8e-8)    1e-4 (2e-5)   6e-5 (4e-5)
edge res_alpha = 8m+8 *  3e-10 (1e-10)  3e-6 (8e-7)   3e-6 (1e-6)
=======================  =============  ============  ============

(* the defaults; m = mmax = 2.)  The separable activation alone, on unit-variance inputs (lmax = 2, node grid):
res_beta 3 → 2e-1, 6 → 2e-2, 12 → 1e-3, 24 → 8e-6.  The error grows with the size of the activations, so trained
weights may give larger errors than these: raise the resolution (or use the exactly equivariant gate activation)
where that matters.  For comparison, the paper's 18 × 18 equiangular grid at lmax = 6 is about as exact as
res_beta = 9 here, coarser than the 2l+2 row above.
"""

from __future__ import annotations

import torch
from torch import nn

from potentials.nn.sphere_grid import sh_grid_matrices


class S2Grid(nn.Module):
    """Projection of coefficient tensors [B, K, C] to grid values [B, G, C] and back.

    Args:
        lmax: maximum degree.
        index: [K] positions of the used coefficients in the l-major layout (all of them for node features; the
            |m| ≤ mmax ones, in edge-layout order, for edge-frame features).
        res_beta, res_alpha: grid resolution (Gauss–Legendre nodes in cos β, equal steps in α).
    """

    def __init__(self, lmax: int, index: torch.Tensor, res_beta: int, res_alpha: int) -> None:
        super().__init__()
        self.res_beta, self.res_alpha = int(res_beta), int(res_alpha)
        to_grid, from_grid = sh_grid_matrices(lmax, res_beta, res_alpha, index, polar_axis="y")
        self.register_buffer("to_grid_mat", to_grid, persistent=False)
        self.register_buffer("from_grid_mat", from_grid, persistent=False)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K, C] coefficients → [B, G, C] values."""
        return torch.matmul(self.to_grid_mat.to(x.dtype), x)

    def from_grid(self, f: torch.Tensor) -> torch.Tensor:
        """[B, G, C] values → [B, K, C] coefficients."""
        return torch.matmul(self.from_grid_mat.to(f.dtype), f)


class GridSiLU(torch.autograd.Function):
    """out[b] = A · SiLU(S · x[b]) for x [B, K, C], computed over chunks of rows so that the grid values [B, G, C]
    never exist at once (the backward pass recomputes them chunk by chunk).

    When the backward pass itself must be differentiable (``create_graph=True``, as when training on forces) it is
    written in ordinary differentiable operations instead, so higher derivatives are exact.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(x, synthesis, analysis)
        ctx.chunk = chunk
        out = x.new_empty(x.shape[0], analysis.shape[0], x.shape[2])
        for start in range(0, x.shape[0], chunk):
            values = nn.functional.silu(torch.matmul(synthesis, x[start:start + chunk]))
            torch.matmul(analysis, values, out=out[start:start + chunk])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, synthesis, analysis = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of this backward pass is being built
            y = torch.matmul(synthesis, x)
            sig = torch.sigmoid(y)
            slope = sig * (1.0 + y * (1.0 - sig))
            return torch.matmul(synthesis.T, slope * torch.matmul(analysis.T, grad)), None, None, None
        grad_x = torch.empty_like(x)
        synthesis_t, analysis_t = synthesis.T.contiguous(), analysis.T.contiguous()
        for start in range(0, x.shape[0], ctx.chunk):
            y = torch.matmul(synthesis, x[start:start + ctx.chunk])
            sig = torch.sigmoid(y)
            slope = sig * (1.0 + y * (1.0 - sig))
            torch.matmul(synthesis_t, slope * torch.matmul(analysis_t, grad[start:start + ctx.chunk]),
                         out=grad_x[start:start + ctx.chunk])
        return grad_x, None, None, None


class SeparableS2Activation(nn.Module):
    """Separable S² activation (EquiformerV2): l = 0 from SiLU of separate scalars, l > 0 from SiLU on the grid.

    out[:, 0] = SiLU(scalars);  out[:, 1:] = from_grid(SiLU(to_grid(x)))[:, 1:]   (x includes its l = 0 part).
    The first coefficient of the layout must be l = 0 (true of both layouts used here).
    """

    def __init__(self, grid: S2Grid, chunk: int = 128) -> None:
        super().__init__()
        self.grid = grid
        self.chunk = int(chunk)
        self.act = nn.SiLU()

    def forward(self, scalars: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """scalars [B, C], x [B, K, C] → [B, K, C]."""
        synthesis = self.grid.to_grid_mat.to(x.dtype)
        analysis = self.grid.from_grid_mat[1:].to(x.dtype)
        higher = GridSiLU.apply(x, synthesis, analysis, self.chunk)
        return torch.cat([self.act(scalars).unsqueeze(1), higher], dim=1)


class GridMLP(nn.Module):
    """The feed-forward S² network's point-wise part: an MLP applied to the C channels at every grid point.

    out[:, 0] = scalars (computed by the caller);  out[:, 1:] = from_grid(MLP(to_grid(x)))[:, 1:].
    MLP = Linear → SiLU → Linear → SiLU → Linear, all without bias (so that the zero function stays zero).
    """

    def __init__(self, grid: S2Grid, channels: int) -> None:
        super().__init__()
        self.grid = grid
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels, bias=False), nn.SiLU(),
            nn.Linear(channels, channels, bias=False), nn.SiLU(),
            nn.Linear(channels, channels, bias=False),
        )

    def forward(self, scalars: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """scalars [B, C], x [B, K, C] → [B, K, C]."""
        values = self.mlp(self.grid.to_grid(x))
        higher = torch.matmul(self.grid.from_grid_mat[1:].to(x.dtype), values)
        return torch.cat([scalars.unsqueeze(1), higher], dim=1)
