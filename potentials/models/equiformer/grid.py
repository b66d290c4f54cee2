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

from potentials.nn import grad_scope, threads
from potentials.nn.native import grid_kernels
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
    """out[b] = A · SiLU(S · x[b]) for x [B, K, C] (S [G, K] to the grid, A [K', G] back).

    The coefficients are moved to the last axis ([B·C, K] rows), so each projection is one large matrix product
    instead of B small ones, and the rows are processed in chunks so that the grid values [B·C, G] never exist at
    once (the backward pass recomputes them chunk by chunk, with a fused SiLU derivative).

    The backward pass is itself a function with a chunked backward (:class:`GridSiLUGrad`), so training on forces
    (a derivative of this derivative) never holds grid values of all rows either.

    On the CPU the three steps (this function, its gradient and the gradient's derivative) run in a compiled kernel
    (:mod:`potentials.nn.native`) where one can be built: the same function, the grid values of one row's channel
    tile kept in cache, 2–4× faster than the chunked tensor operations, which remain the path on GPUs and the
    fallback.  (The same holds for :class:`GridMLPCore`'s point-wise steps, 1.3× on the whole core.)
    """

    #: grid values per chunk (rows × G): 1 M numbers, 4 MB in float32 (2^18 … 2^22 time alike on 64–500 atoms)
    CHUNK_VALUES = 1 << 20

    @staticmethod
    def forward(ctx, x: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
        kernels = grid_kernels(x, synthesis, analysis)
        if kernels is not None:  # the compiled kernel (potentials.nn.native): the same function, fused
            x, synthesis, analysis = x.contiguous(), synthesis.contiguous(), analysis.contiguous()
            ctx.save_for_backward(x, None, synthesis, analysis)
            return kernels.forward(x, synthesis, analysis)
        n, k, c = x.shape
        rows = _rows(x)
        ctx.save_for_backward(x, rows, synthesis, analysis)
        out = x.new_empty(n * c, analysis.shape[0])
        synthesis_t, analysis_t = synthesis.T, analysis.T
        for chunk in _chunks(n * c, synthesis.shape[0]):
            values = torch.mm(rows[chunk], synthesis_t)
            nn.functional.silu(values, inplace=True)
            torch.mm(values, analysis_t, out=out[chunk])
        return _unrows(out, n, c)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rows, synthesis, analysis = ctx.saved_tensors
        return GridSiLUGrad.apply(x, grad, synthesis, analysis, rows), None, None


class GridSiLUGrad(torch.autograd.Function):
    """The gradient of :class:`GridSiLU` as a function of its input and of the output gradient g:

        per row:  y = S·x,  h = Aᵀ·g,  grad_x = Sᵀ·(SiLU'(y) ⊙ h).

    Its own backward pass (needed when training on forces), for an incoming gradient u of grad_x, with v = S·u:

        ∂/∂g = A·(SiLU'(y) ⊙ v),   ∂/∂x = Sᵀ·(SiLU''(y) ⊙ h ⊙ v),

    chunked over rows like the forward pass; only a third derivative falls back to plain differentiable operations.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, grad: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """``rows``: ``_rows(x)`` if the caller has it already."""
        kernels = grid_kernels(x, grad, synthesis, analysis)
        if kernels is not None:
            x, grad = x.contiguous(), grad.contiguous()
            synthesis, analysis = synthesis.contiguous(), analysis.contiguous()
            ctx.save_for_backward(x, None, grad, None, synthesis, analysis)
            return kernels.backward(x, grad, synthesis, analysis)
        n, k, c = x.shape
        rows = _rows(x) if rows is None else rows
        grad_rows = _rows(grad)
        ctx.save_for_backward(x, rows, grad, grad_rows, synthesis, analysis)
        out = x.new_empty(n * c, k)
        # right-hand matrices in column-major order: twice as fast for these narrow products (MKL, 2 threads)
        synthesis_t, synthesis_cm = synthesis.T, synthesis.T.contiguous().T
        for chunk in _chunks(n * c, synthesis.shape[0]):
            y = torch.mm(rows[chunk], synthesis_t)
            grad_y = torch.ops.aten.silu_backward(torch.mm(grad_rows[chunk], analysis), y)
            torch.mm(grad_y, synthesis_cm, out=out[chunk])
        return _unrows(out, n, c)

    @staticmethod
    def backward(ctx, u: torch.Tensor):
        x, rows, grad, grad_rows, synthesis, analysis = ctx.saved_tensors
        n, k, c = x.shape
        need_x, need_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # a graph of this backward pass is being built: differentiable operations only
            y = torch.mm(_rows(x), synthesis.T)
            v = torch.mm(_rows(u), synthesis.T)
            h = torch.mm(_rows(grad), analysis)
            slope, curvature = _silu_slope(y), _silu_curvature(y)
            grad_x = _unrows(torch.mm(curvature * h * v, synthesis), n, c) if need_x else None
            grad_g = _unrows(torch.mm(slope * v, analysis.T), n, c) if need_grad else None
            return grad_x, grad_g, None, None, None
        kernels = grid_kernels(x, grad, u, synthesis, analysis)
        if kernels is not None:
            grad_x, grad_g = kernels.double_backward(x.contiguous(), grad.contiguous(), u.contiguous(),
                                                    synthesis.contiguous(), analysis.contiguous(), need_x, need_grad)
            return grad_x, grad_g, None, None, None
        rows = _rows(x) if rows is None else rows
        grad_rows = _rows(grad) if grad_rows is None else grad_rows
        u_rows = _rows(u)
        out_x = x.new_empty(n * c, k) if need_x else None
        out_g = x.new_empty(n * c, analysis.shape[0]) if need_grad else None
        synthesis_t, synthesis_cm, analysis_t = synthesis.T, synthesis.T.contiguous().T, analysis.contiguous().T
        for chunk in _chunks(n * c, synthesis.shape[0]):
            y = torch.mm(rows[chunk], synthesis_t)
            v = torch.mm(u_rows[chunk], synthesis_t)
            if need_grad:  # SiLU'(y) ⊙ v
                torch.mm(torch.ops.aten.silu_backward(v, y), analysis_t, out=out_g[chunk])
            if need_x:  # SiLU''(y) ⊙ h ⊙ v with SiLU'' = σ·(1 − σ)·(2 + y·(1 − 2σ))
                sig = torch.sigmoid(y)
                t = torch.addcmul(y, y, sig, value=-2.0).add_(2.0)  # 2 + y − 2yσ
                t.mul_(sig).mul_(sig.neg_().add_(1.0)).mul_(torch.mm(grad_rows[chunk], analysis)).mul_(v)
                torch.mm(t, synthesis_cm, out=out_x[chunk])
        grad_x = _unrows(out_x, n, c) if need_x else None
        return grad_x, (_unrows(out_g, n, c) if need_grad else None), None, None, None


def _chunks(n: int, values_each: int, budget: int | None = None) -> list[slice]:
    """Ranges over n rows (or nodes) of ``values_each`` grid values each, at most ``budget`` (default
    :attr:`GridSiLU.CHUNK_VALUES`) per range, as few as that allows and of sizes differing by at most one (64 nodes
    go as 32 + 32, not 56 + 8); none for n = 0."""
    step = max(1, (budget or GridSiLU.CHUNK_VALUES) // max(values_each, 1))
    count = -(-n // step)  # ceil
    bounds = [n * i // count for i in range(count + 1)] if count else []
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _silu_slope(y: torch.Tensor) -> torch.Tensor:
    """SiLU'(y) = σ(y)·(1 + y·(1 − σ(y))) in differentiable operations (for derivatives of the backward pass)."""
    sig = torch.sigmoid(y)
    return sig * (1.0 + y * (1.0 - sig))


def _silu_curvature(y: torch.Tensor) -> torch.Tensor:
    """SiLU''(y) = σ(y)·(1 − σ(y))·(2 + y·(1 − 2σ(y))) in differentiable operations."""
    sig = torch.sigmoid(y)
    return sig * (1.0 - sig) * (2.0 + y * (1.0 - 2.0 * sig))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, K, C] → [B·C, K] (a copy with the coefficients last)."""
    n, k, c = x.shape
    return x.transpose(1, 2).reshape(n * c, k)


def _unrows(rows: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """[B·C, K] → [B, K, C] (contiguous)."""
    return rows.view(n, c, rows.shape[1]).transpose(1, 2).contiguous()


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
        higher = GridSiLU.apply(threads.enter(x, x.shape[0] * synthesis.shape[0] * x.shape[2]), synthesis, analysis)
        return torch.cat([self.act(scalars).unsqueeze(1), threads.enter(higher, x.numel())], dim=1)


class GridMLPCore(torch.autograd.Function):
    """out[b] = A · SiLU(SiLU(S · h[b]) · Wᵀ) for h [B, K, C]: the grid part of :class:`GridMLP`.

    The grid values are laid out grid-point-major ([G, B·C] for the projections, [G·B, C] for the weight W), so
    every step is one large matrix product, and they are made chunk by chunk over B, so that no [B, G, C] tensor
    exists at once; the backward pass recomputes them per chunk.  As in :class:`GridSiLU`, a backward pass that
    must itself be differentiable is written in ordinary differentiable operations.

    On the CPU, where the compiled kernels (:mod:`potentials.nn.native`) can be built, the point-wise steps on each
    side of the matrix product with W run there instead, node-major ([B, G, C]), in chunks of
    :attr:`KERNEL_CHUNK_VALUES` grid values.
    """

    #: grid values per chunk on the kernel path (16 MB in float32)
    KERNEL_CHUNK_VALUES = 1 << 22
    #: without a weight gradient (inference), the forward pass keeps the pre-activations for the backward pass (a
    #: matrix product and a kernel less per layer) up to this many grid values (128 MB in float32, ~1800 atoms at
    #: lmax 2 and 64 channels); above, the backward pass recomputes them
    KEEP_VALUES = 1 << 25

    @staticmethod
    def forward(ctx, h: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor, weight: torch.Tensor
                ) -> torch.Tensor:
        n, k, c = h.shape
        ctx.kept = None
        kernels = grid_kernels(h, synthesis, analysis, weight)
        if kernels is not None:
            h, synthesis, analysis = h.contiguous(), synthesis.contiguous(), analysis.contiguous()
            ctx.save_for_backward(h, None, synthesis, analysis, weight)
            out = h.new_empty(n, analysis.shape[0], c)
            keep = not ctx.needs_input_grad[3] and n * synthesis.shape[0] * c <= GridMLPCore.KEEP_VALUES
            ctx.kept = [] if keep else None
            for chunk in _chunks(n, synthesis.shape[0] * c, GridMLPCore.KERNEL_CHUNK_VALUES):
                a = kernels.mlp_to_grid(h[chunk], synthesis)
                pre = torch.mm(a.view(-1, c), weight.T).view(a.shape)
                out[chunk] = kernels.mlp_from_grid(pre, analysis)
                if keep:
                    ctx.kept.append(pre)
            return out
        ht = h.transpose(0, 1).contiguous()  # [K, B, C]
        ctx.save_for_backward(h, ht, synthesis, analysis, weight)
        out = h.new_empty(analysis.shape[0], n, c)
        weight_t = weight.T
        for chunk in _chunks(n, synthesis.shape[0] * c):
            u = torch.mm(synthesis, ht[:, chunk].reshape(k, -1)).view(-1, c)
            v = nn.functional.silu(torch.mm(nn.functional.silu(u, inplace=True), weight_t), inplace=True)
            out[:, chunk] = torch.mm(analysis, v.view(synthesis.shape[0], -1)).view(-1, chunk.stop - chunk.start, c)
        return out.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, ht, synthesis, analysis, weight = ctx.saved_tensors
        n, k, c = h.shape
        g = synthesis.shape[0]
        kept, ctx.kept = ctx.kept, None  # released with this pass, not with the graph
        if torch.is_grad_enabled():  # a graph of this backward pass is being built: differentiable operations only
            u = torch.mm(synthesis, h.transpose(0, 1).reshape(k, n * c)).view(-1, c)
            a = nn.functional.silu(u)
            pre = torch.mm(a, weight.T)
            grad_v = torch.mm(analysis.T, grad.transpose(0, 1).reshape(-1, n * c)).view(-1, c)
            grad_pre = grad_v * _silu_slope(pre)
            grad_weight = torch.mm(grad_pre.T, a)
            grad_u = torch.mm(grad_pre, weight) * _silu_slope(u)
            grad_h = torch.mm(synthesis.T, grad_u.view(g, n * c)).view(k, n, c).transpose(0, 1)
            return grad_h, None, None, grad_weight
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[3] else None
        kernels = grid_kernels(h, grad, synthesis, analysis, weight)
        if kernels is not None:
            grad, grad_h = grad.contiguous(), torch.empty_like(h)
            for i, chunk in enumerate(_chunks(n, g * c, GridMLPCore.KERNEL_CHUNK_VALUES)):
                if kept is not None:  # kept only without a weight gradient, which alone needs a
                    pre = kept[i]
                else:
                    a = kernels.mlp_to_grid(h[chunk], synthesis)
                    pre = torch.mm(a.view(-1, c), weight.T).view(a.shape)
                grad_pre = kernels.mlp_from_grid_backward(pre, grad[chunk], analysis)
                if grad_weight is not None:  # not in inference (potentials.nn.grad_scope)
                    grad_weight.addmm_(grad_pre.view(-1, c).T, a.view(-1, c))
                grad_a = torch.mm(grad_pre.view(-1, c), weight).view(pre.shape)
                grad_h[chunk] = kernels.mlp_to_grid_backward(h[chunk], grad_a, synthesis)
            return grad_h, None, None, grad_weight
        ht = h.transpose(0, 1).contiguous() if ht is None else ht
        gt = grad.transpose(0, 1).contiguous()  # [K', B, C]
        grad_ht = h.new_empty(k, n, c)
        for chunk in _chunks(n, g * c):
            u = torch.mm(synthesis, ht[:, chunk].reshape(k, -1)).view(-1, c)
            a = nn.functional.silu(u)
            pre = torch.mm(a, weight.T)
            grad_v = torch.mm(analysis.T, gt[:, chunk].reshape(analysis.shape[0], -1)).view(-1, c)
            grad_pre = torch.ops.aten.silu_backward(grad_v, pre)
            if grad_weight is not None:  # not in inference (potentials.nn.grad_scope)
                grad_weight.addmm_(grad_pre.T, a)
            grad_u = torch.ops.aten.silu_backward(torch.mm(grad_pre, weight), u)
            grad_ht[:, chunk] = torch.mm(synthesis.T, grad_u.view(g, -1)).view(k, -1, c)
        return grad_ht.transpose(0, 1).contiguous(), None, None, grad_weight


class GridMLP(nn.Module):
    """The feed-forward S² network's point-wise part: an MLP applied to the C channels at every grid point.

    out[:, 0] = scalars (computed by the caller);  out[:, 1:] = from_grid(MLP(to_grid(x)))[:, 1:].
    MLP = Linear → SiLU → Linear → SiLU → Linear, all without bias (so that the zero function stays zero).

    The first and last Linear act on channels only, so they commute with the projections, which act on the
    coefficient axis only: they are applied to the K coefficients instead of the G ≫ K grid values (the same
    function, a third of the grid work).  The rest runs in :class:`GridMLPCore`.
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
        h = threads.enter(first(x), x.shape[0] * synthesis.shape[0] * x.shape[2])  # grid values (nn.threads)
        h = GridMLPCore.apply(h, synthesis, analysis, grad_scope.parameter(middle.weight))
        higher = last(threads.enter(h, x.numel()))
        return torch.cat([scalars.unsqueeze(1), higher], dim=1)
