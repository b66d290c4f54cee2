"""Point-wise non-linearities on the sphere: coefficients → values on a grid → non-linearity → coefficients.

A function on the sphere with real spherical-harmonic coefficients x_lm (component normalisation, polar axis y) is
sampled on a product grid (:mod:`potentials.nn.sphere_grid`): Gauss–Legendre nodes in cos β (``res_beta`` of them)
times ``res_alpha`` equally spaced angles α about the polar axis.  With ``res_beta ≥ lmax + 1`` and
``res_alpha ≥ 2·mmax + 1`` the grid integrates every product of two kept harmonics exactly, so
``from_grid(to_grid(x)) = x`` to round-off and the maps are equivariant for band-limited signals.  A non-linearity
σ(f) is not band-limited: projecting it back aliases the part of σ(f) above the grid's exactness into the kept
coefficients, so the S² activation is equivariant only up to a quadrature error that falls (roughly exponentially)
with the resolution.  It is the only approximately equivariant step of the model.

Measured rotation error of forces (stress) (float64, relative max deviation over 3 random rotations of a rattled
4-atom CuAl cell, 2-block models at initialisation with C channels, ``tests/models/test_equiformer_grid.py``'s
``_model``).  Node grid [res_beta, 2·res_beta], edge grid at its default unless noted:

====================  ==============  ==============  ==============  ==============
node res_beta         lmax=2, C=64    lmax=3, C=32    lmax=3, C=64    lmax=4, C=32
====================  ==============  ==============  ==============  ==============
4(l+1)                5e-7 (2e-7) *   7e-4 (9e-4)     2e-4 (7e-5)     2e-4 (7e-5)
5(l+1)                                2e-4 (1e-4)
6(l+1)                                3e-5 (2e-5) *                   5e-6 (3e-6) *
8(l+1)                                3e-6 (4e-6)
====================  ==============  ==============  ==============  ==============

The shipped ``model=equiformer_v2`` preset (lmax 3, C 32, 3 blocks): 2.5e-4 and 8e-5 (two seeds) at 4(l+1), 8e-6
and 8e-7 at 6(l+1).  The error varies with the initial weights and grows quickly with lmax, hence the default of
4(l+1) up to lmax 2 and 6(l+1) above.

Edge grid (same models, default node grid), force error against res_alpha with res_beta = lmax + 1:

==========================  ======================================================================
lmax, mmax, C               res_alpha → force rotation error
==========================  ======================================================================
2, 2, 64                    8 → 2e-4,  10 → 3e-5,  12 → 4e-6,  **14** → 5e-7,  16 → 2e-7,  24 → 2e-7
2, 1, 64                    5 → 1e-3,  7 → 8e-5,  9 → 8e-6,  **10** → 2e-6,  12 → 9e-8,  16 → 3e-8
3, 2, 32                    14 → 3e-4,  **24** → 3e-5 (the node grid's error)
3, 3, 32                    16 → 1e-3,  21 → 2e-4,  28 → 2e-5,  **32** → 2e-5,  40 → 2e-5
==========================  ======================================================================

(bold: the defaults, res_alpha = 4·mmax + 6 up to lmax 2 and 8·mmax + 8 above; mmax = 0 is exact at any
res_alpha.)  In β the edge grid needs no more than the lmax + 1 nodes that make it exact: rotations about the edge
axis, the only freedom of the edge frame, move the grid along α.

Trained weights give larger errors than these.  After 150 steps (lr 2e-3) on the default EMT metal set, an
lmax 2, mmax 2, C 64, 2-block model gave, on a rattled 32-atom CuAu cell: 8e-5 (stress 5e-5) at the default grids
(12 × 24 node, 3 × 14 edge points); node grid 16 × 32: 6e-5, and with a 3 × 16 edge grid 4e-5; with the former
3 × 24 edge grid: 8e-5 at 12 × 24 nodes, 1.2e-4 at 10 × 20, 3.5e-5 at 16 × 32; 7e-6 at 24 × 48 nodes with a
3 × 32 edge grid; 1e-3 at eSCN-MD's 6 × 7 grids.  At the defaults the node grid dominates.  Where the rotation
error of a trained model matters, raise the resolutions (grids hold no weights: the cost is time only) or use the
exactly equivariant gate activation.  The separable activation alone, on unit-variance inputs (lmax = 2, node
grid): res_beta 3 → 2e-1, 6 → 2e-2, 12 → 1e-3, 24 → 8e-6.  For comparison, the paper's 18 × 18 equiangular grid
at lmax = 6 is about as exact as res_beta = 9 here, far coarser than any row above.
"""

from __future__ import annotations

import torch
from torch import nn

from potentials import accel
from potentials.accel import ops
from potentials.nn import grad_scope
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


class SeparableS2Activation(nn.Module):
    """Separable S² activation (EquiformerV2): l = 0 from SiLU of separate scalars, l > 0 from SiLU on the grid.

    out[:, 0] = SiLU(scalars);  out[:, 1:] = from_grid(SiLU(to_grid(x)))[:, 1:]   (x includes its l = 0 part).
    The first coefficient of the layout must be l = 0 (true of both layouts used here).
    """

    def __init__(self, grid: S2Grid) -> None:
        super().__init__()
        self.grid = grid
        self.act = nn.SiLU()

    def forward(self, scalars: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """scalars [B, C], x [B, K, C] → [B, K, C]."""
        synthesis = self.grid.to_grid_mat.to(x.dtype)
        analysis = self.grid.from_grid_mat[1:].to(x.dtype)
        higher = ops.s2_activation(accel.mark_steps(x, x.shape[0] * synthesis.shape[0] * x.shape[2]), synthesis,
                                   analysis)
        return torch.cat([self.act(scalars).unsqueeze(1), accel.mark_steps(higher, x.numel())], dim=1)


class GridMLP(nn.Module):
    """The feed-forward S² network's point-wise part: an MLP applied to the C channels at every grid point.

    out[:, 0] = scalars (computed by the caller);  out[:, 1:] = from_grid(MLP(to_grid(x)))[:, 1:].
    MLP = Linear → SiLU → Linear → SiLU → Linear, all without bias (so that the zero function stays zero).

    The first and last Linear act on channels only, so they commute with the projections, which act on the
    coefficient axis only: they are applied to the K coefficients instead of the G ≫ K grid values (the same
    function, a third of the grid work).  The rest is :func:`potentials.accel.ops.grid_mlp_core`.
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
        first, _, middle, _, last = self.mlp
        synthesis = self.grid.to_grid_mat.to(x.dtype)
        analysis = self.grid.from_grid_mat[1:].to(x.dtype)
        h = accel.mark_steps(first(x), x.shape[0] * synthesis.shape[0] * x.shape[2])  # steps on grid values
        h = ops.grid_mlp_core(h, synthesis, analysis, grad_scope.parameter(middle.weight))
        higher = last(accel.mark_steps(h, x.numel()))
        return torch.cat([scalars.unsqueeze(1), higher], dim=1)
