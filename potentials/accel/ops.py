"""The hot operations of the equivariant models, written in plain PyTorch: the reference implementations.

Each public function here is differentiable to any order and runs on any device and dtype.  A model calls these;
when the current ``kernels`` choice (:func:`potentials.accel.backend`) selects a compiled backend that applies to
the operands, the call runs that backend's version instead (:mod:`potentials.accel.cpu`: the same function to
round-off).  ``op.reference`` is the plain version whatever the choice.

* :func:`s2_activation`: A · SiLU(S · x) per row — the separable S² activation's grid round trip;
* :func:`grid_mlp_core`: A · SiLU(SiLU(S · h) · Wᵀ) per row — the grid MLP's grid part;
* :func:`rotate_pairs`: node pairs [x_src, x_dst] rotated into the edge frames;
* :func:`rotate_back_sum`: edge-frame messages rotated back and summed into their centres.

The first two are chunked autograd functions: the grid values of all rows never exist at once, in the forward
pass or in the backward pass, which recomputes them chunk by chunk.  Under ``torch.compile`` they are plain
unchunked products instead (a chunk count would tie the compiled graph to one size), and the compiled backends
here are not called (the compiler cannot trace them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from potentials.accel.backends import implementation

#: the (order [2, E], start [2, N + 1]) of :func:`incidence`, or a function that returns them (computed on demand)
Incidence = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def dispatched(reference: Callable) -> Callable:
    """The operation ``reference`` (by its name), run by the backend the current choice selects for its
    floating-point tensor arguments, or as ``reference`` itself."""
    name = reference.__name__

    @functools.wraps(reference)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # the compiler traces the reference (it cannot see into the kernels)
            return reference(*args, **kwargs)
        floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        compiled = implementation(name, *floats)
        return (compiled or reference)(*args, **kwargs)

    run.reference = reference
    return run


@dispatched
def s2_activation(x: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
    """out[b] = A · SiLU(S · x[b]) for x [B, K, C], synthesis S [G, K] (to the grid), analysis A [K', G] (back)."""
    if torch.compiler.is_compiling():  # unchunked: the number of chunks depends on B, a graph would for every B
        return torch.matmul(analysis, torch.nn.functional.silu(torch.matmul(synthesis, x)))
    return GridSiLU.apply(x, synthesis, analysis)


@dispatched
def grid_mlp_core(h: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor, weight: torch.Tensor
                  ) -> torch.Tensor:
    """out[b] = A · SiLU(SiLU(S · h[b]) · Wᵀ) for h [B, K, C], weight W [C, C]: [B, K', C]."""
    if torch.compiler.is_compiling():  # unchunked, as in s2_activation
        silu = torch.nn.functional.silu
        return torch.matmul(analysis, silu(torch.matmul(silu(torch.matmul(synthesis, h)), weight.T)))
    return GridMLPCore.apply(h, synthesis, analysis, weight)


@dispatched
def rotate_pairs(x: torch.Tensor, rot: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, row_first: torch.Tensor,
                 row_length: torch.Tensor, incidence: Incidence | None = None) -> torch.Tensor:
    """bmm(rot, [x[src], x[dst]]) per edge (channels concatenated, source first): [N, K, C] → [E, R, 2C].

    ``rot`` [E, R, K] is block-diagonal: row r is non-zero in columns ``row_first[r]`` … ``row_first[r] +
    row_length[r] − 1`` only (compiled versions read only those).  ``incidence``: the edges' :func:`incidence`, when
    the caller keeps it for several calls.
    """
    return torch.bmm(rot, gather_pairs(x, src, dst))


@dispatched
def rotate_back_sum(msg: torch.Tensor, rot: torch.Tensor, dst: torch.Tensor, num_nodes: int, row_first: torch.Tensor,
                    row_length: torch.Tensor, incidence: Incidence | None = None) -> torch.Tensor:
    """Σ_{e: dst[e] = n} rot[e]ᵀ · msg[e] per node n: edge-frame messages [E, R, C] → [N, K, C] (arguments as in
    :func:`rotate_pairs`)."""
    msg = torch.bmm(rot.transpose(1, 2), msg)
    return msg.new_zeros(num_nodes, *msg.shape[1:]).index_add_(0, dst, msg)


def gather_pairs(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[x[src], x[dst]] per edge: node features [N, K, C] → [E, K, 2C] (source channels first).

    One gather of C-channel rows from x viewed as [N·K, C], in the output's own order, so that its backward pass is
    a single index_add of a contiguous gradient (the halves of a concatenation's gradient would be strided).
    """
    n, k, c = x.shape
    coeff = torch.arange(k, device=x.device)
    rows = torch.stack([src[:, None] * k + coeff, dst[:, None] * k + coeff], dim=-1)
    return x.reshape(n * k, c).index_select(0, rows.reshape(-1)).view(-1, k, 2 * c)


def incidence(src: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [2, E], start [2, N + 1]): the edges sorted (stably) by src and by dst, and where each node's edges
    begin in those orders (int64)."""
    orders, starts = [], []
    for index in (src.long(), dst.long()):
        orders.append(torch.argsort(index, stable=True))
        start = index.new_zeros(num_nodes + 1)
        torch.cumsum(torch.bincount(index, minlength=num_nodes), 0, out=start[1:])
        starts.append(start)
    return torch.stack(orders), torch.stack(starts)


class GridSiLU(torch.autograd.Function):
    """out[b] = A · SiLU(S · x[b]) for x [B, K, C] (S [G, K] to the grid, A [K', G] back).

    The coefficients are moved to the last axis ([B·C, K] rows), so each projection is one large matrix product
    instead of B small ones, and the rows are processed in chunks so that the grid values [B·C, G] never exist at
    once (the backward pass recomputes them chunk by chunk, with a fused SiLU derivative).  The backward pass is
    itself a function with a chunked backward (:class:`GridSiLUGrad`), so training on forces never holds grid values
    of all rows either.
    """

    #: grid values per chunk (rows × G): 1 M numbers, 4 MB in float32
    CHUNK_VALUES = 1 << 20

    @staticmethod
    def forward(ctx, x: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
        n, k, c = x.shape
        rows = _rows(x)
        ctx.save_for_backward(x, rows, synthesis, analysis)
        out = x.new_empty(n * c, analysis.shape[0])
        synthesis_t, analysis_t = synthesis.T, analysis.T
        for chunk in chunks(n * c, synthesis.shape[0]):
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
        n, k, c = x.shape
        rows = _rows(x) if rows is None else rows
        grad_rows = _rows(grad)
        ctx.save_for_backward(x, rows, grad, grad_rows, synthesis, analysis)
        out = x.new_empty(n * c, k)
        # right-hand matrices in column-major order: faster for these narrow products
        synthesis_t, synthesis_cm = synthesis.T, synthesis.T.contiguous().T
        for chunk in chunks(n * c, synthesis.shape[0]):
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
            return (*grid_silu_second_derivatives(x, grad, u, synthesis, analysis, need_x, need_grad), None, None,
                    None)
        u_rows = _rows(u)
        out_x = x.new_empty(n * c, k) if need_x else None
        out_g = x.new_empty(n * c, analysis.shape[0]) if need_grad else None
        synthesis_t, synthesis_cm, analysis_t = synthesis.T, synthesis.T.contiguous().T, analysis.contiguous().T
        for chunk in chunks(n * c, synthesis.shape[0]):
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


def grid_silu_second_derivatives(x: torch.Tensor, grad: torch.Tensor, u: torch.Tensor, synthesis: torch.Tensor,
                                 analysis: torch.Tensor, need_x: bool = True, need_grad: bool = True
                                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:class:`GridSiLUGrad`'s backward pass (by x, by g) in differentiable operations, unchunked: for a graph of it
    (a third derivative)."""
    n, k, c = x.shape
    y = torch.mm(_rows(x), synthesis.T)
    v = torch.mm(_rows(u), synthesis.T)
    h = torch.mm(_rows(grad), analysis)
    grad_x = _unrows(torch.mm(silu_curvature(y) * h * v, synthesis), n, c) if need_x else None
    grad_g = _unrows(torch.mm(silu_slope(y) * v, analysis.T), n, c) if need_grad else None
    return grad_x, grad_g


class GridMLPCore(torch.autograd.Function):
    """out[b] = A · SiLU(SiLU(S · h[b]) · Wᵀ) for h [B, K, C]: the grid part of the EquiformerV2 grid MLP.

    The grid values are laid out grid-point-major ([G, B·C] for the projections, [G·B, C] for the weight W), so
    every step is one large matrix product, and they are made chunk by chunk over B, so that no [B, G, C] tensor
    exists at once; the backward pass recomputes them per chunk.  A backward pass that must itself be differentiable
    is written in ordinary differentiable operations (:func:`grid_mlp_core_backward`).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor, weight: torch.Tensor
                ) -> torch.Tensor:
        n, k, c = h.shape
        ht = h.transpose(0, 1).contiguous()  # [K, B, C]
        ctx.save_for_backward(h, ht, synthesis, analysis, weight)
        out = h.new_empty(analysis.shape[0], n, c)
        weight_t = weight.T
        for chunk in chunks(n, synthesis.shape[0] * c):
            u = torch.mm(synthesis, ht[:, chunk].reshape(k, -1)).view(-1, c)
            v = nn.functional.silu(torch.mm(nn.functional.silu(u, inplace=True), weight_t), inplace=True)
            out[:, chunk] = torch.mm(analysis, v.view(synthesis.shape[0], -1)).view(-1, chunk.stop - chunk.start, c)
        return out.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, ht, synthesis, analysis, weight = ctx.saved_tensors
        n, k, c = h.shape
        g = synthesis.shape[0]
        if torch.is_grad_enabled():  # a graph of this backward pass is being built: differentiable operations only
            return grid_mlp_core_backward(h, grad, synthesis, analysis, weight)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[3] else None
        gt = grad.transpose(0, 1).contiguous()  # [K', B, C]
        grad_ht = h.new_empty(k, n, c)
        for chunk in chunks(n, g * c):
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


def grid_mlp_core_backward(h: torch.Tensor, grad: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor,
                           weight: torch.Tensor) -> tuple[torch.Tensor, None, None, torch.Tensor]:
    """:class:`GridMLPCore`'s gradients (by h, -, -, by W) in differentiable operations, unchunked: for a graph of
    the backward pass (training on forces)."""
    n, k, c = h.shape
    g = synthesis.shape[0]
    u = torch.mm(synthesis, h.transpose(0, 1).reshape(k, n * c)).view(-1, c)
    a = nn.functional.silu(u)
    pre = torch.mm(a, weight.T)
    grad_v = torch.mm(analysis.T, grad.transpose(0, 1).reshape(-1, n * c)).view(-1, c)
    grad_pre = grad_v * silu_slope(pre)
    grad_weight = torch.mm(grad_pre.T, a)
    grad_u = torch.mm(grad_pre, weight) * silu_slope(u)
    grad_h = torch.mm(synthesis.T, grad_u.view(g, n * c)).view(k, n, c).transpose(0, 1)
    return grad_h, None, None, grad_weight


def chunks(n: int, values_each: int, budget: int | None = None) -> list[slice]:
    """Ranges over n rows (or nodes) of ``values_each`` grid values each, at most ``budget`` (default
    :attr:`GridSiLU.CHUNK_VALUES`) per range, as few as that allows and of sizes differing by at most one (64 nodes
    go as 32 + 32, not 56 + 8); none for n = 0."""
    step = max(1, (budget or GridSiLU.CHUNK_VALUES) // max(values_each, 1))
    count = -(-n // step)  # ceil
    bounds = [n * i // count for i in range(count + 1)] if count else []
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def silu_slope(y: torch.Tensor) -> torch.Tensor:
    """SiLU'(y) = σ(y)·(1 + y·(1 − σ(y))) in differentiable operations."""
    sig = torch.sigmoid(y)
    return sig * (1.0 + y * (1.0 - sig))


def silu_curvature(y: torch.Tensor) -> torch.Tensor:
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
