"""Learnable cubic B-spline functions of the edge length, evaluated by index + cubic polynomial.

A radial function on ``[0, cutoff]`` is written on a uniform knot grid of spacing ``h = cutoff / n_knots``::

    f(r) = Σ_k c_k B_k(r),        B_k = the uniform cubic B-spline supported on [(k−3)h, (k+1)h]

For ``r`` in the knot interval ``[i h, (i+1) h)`` with fraction ``u = r/h − i`` only four basis functions are non-zero,
``B_i … B_{i+3}``, with the closed-form values (they sum to one — partition of unity)::

    b0 = (1 − u)³/6,  b1 = (3u³ − 6u² + 4)/6,  b2 = (−3u³ + 3u² + 3u + 1)/6,  b3 = u³/6

so evaluating F functions at E distances is one ``floor``, four cubic polynomials and a gather of four coefficient
rows (``embedding_bag`` with per-sample weights: no [E, 4, F] intermediate) — no dense basis, no MLP.  Its
backward is one matmul with the [n_knots + 4, F] table and a gather (plus, when the coefficients are trained, one
matmul for their gradient); it is itself differentiable, so forces can be trained on (double backward).

Smooth cutoff: the basis functions ``B_n, B_{n+1}, B_{n+2}`` (n = n_knots) straddle the cutoff; their coefficients
are held at zero, so every function and its first two derivatives vanish exactly at ``r = cutoff`` and stay zero
beyond (the cubic B-spline is C² across its support ends).  No envelope is needed and the function is C²
everywhere.  Each function therefore has ``n_knots`` free coefficients ``c_0 … c_{n−1}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def cubic_bspline_values(u: torch.Tensor) -> torch.Tensor:
    """The four non-zero uniform cubic B-spline values on a knot interval.

    Args:
        u: [...] fraction of the way through the knot interval, in [0, 1].

    Returns:
        [..., 4] values of ``B_i, B_{i+1}, B_{i+2}, B_{i+3}`` at ``u`` (they sum to 1).
    """
    u2 = u * u
    u3 = u2 * u
    one_minus = 1.0 - u
    b0 = one_minus * one_minus * one_minus
    b1 = 3.0 * u3 - 6.0 * u2 + 4.0
    b2 = -3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0
    return torch.stack([b0, b1, b2, u3], dim=-1) * (1.0 / 6.0)


def _gradient_used(tensor: torch.Tensor) -> bool:
    """Whether the running backward pass will consume a gradient for ``tensor``.

    Forces and stress only differentiate with respect to positions and strain: then the table gradient (a matmul
    over all edges) is skipped.  Uses the autograd engine's own record of which nodes it will run; if that is not
    available the answer is True (always compute), which is merely slower.
    """
    node = tensor.grad_fn
    if node is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class _SplineGather(torch.autograd.Function):
    """out[e] = Σ_k values[e, k] · table[rows[e, k]]; backward by matmuls against the (small) table."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, rows, table)
        return F.embedding_bag(rows, table, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        values, rows, table = ctx.saved_tensors
        grad_values = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.gather(grad @ table.t(), 1, rows)
        if ctx.needs_input_grad[2] and _gradient_used(table):
            dense = values.new_zeros(rows.shape[0], table.shape[0]).scatter(1, rows, values)
            grad_table = dense.t() @ grad
        return grad_values, None, grad_table


def spline_gather(values: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Weighted sum of four table rows per item: values [E, 4], rows [E, 4] long, table [R, F] → [E, F].

    Differentiable in ``values`` and ``table``, to any order.
    """
    return _SplineGather.apply(values, rows, table)


class UniformCubicBSpline(nn.Module):
    """``num_out`` learnable cubic B-spline functions of the distance, vanishing (C²) at the cutoff.

    Args:
        cutoff: radius where every function reaches zero with zero first and second derivative, Å.
        n_knots: number of uniform knot intervals on ``[0, cutoff]`` (knot spacing ``cutoff / n_knots``); each
            function has ``n_knots`` free coefficients.
        num_out: number of functions F evaluated together.
        init_std: standard deviation of the random initial coefficients.

    Shapes:
        ``forward(r)``: r [E] Å → [E, F]; ``forward(r, split)``: a list of [E, F_k] with Σ F_k = F.
    """

    def __init__(self, cutoff: float, n_knots: int, num_out: int, init_std: float = 1.0) -> None:
        super().__init__()
        if n_knots < 4:
            raise ValueError(f"UniformCubicBSpline needs n_knots >= 4 knot intervals, got {n_knots}")
        if cutoff <= 0:
            raise ValueError(f"UniformCubicBSpline needs a positive cutoff, got {cutoff}")
        self.cutoff = float(cutoff)
        self.n_knots = int(n_knots)
        self.num_out = int(num_out)
        self.coefficients = nn.Parameter(torch.randn(n_knots, num_out) * init_std)

    def locate(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficient rows and basis values at each distance.

        Args:
            r: [E] distances, Å (r ≥ cutoff maps to the all-zero rows past the cutoff).

        Returns:
            rows [E, 4] long: the coefficient rows ``i … i+3`` of the knot interval i holding r;
            values [E, 4]: the basis values weighting those rows (differentiable in r).
        """
        t = (r * (self.n_knots / self.cutoff)).clamp(min=0.0, max=float(self.n_knots))
        index = torch.floor(t.detach()).long().clamp(max=self.n_knots)
        rows = index.unsqueeze(-1) + torch.arange(4, device=r.device)
        return rows, cubic_bspline_values(t - index.to(t.dtype))

    def table(self) -> torch.Tensor:
        """[n_knots + 4, F] coefficient rows: the free ones, then four zero rows (cutoff and beyond)."""
        pad = self.coefficients.new_zeros(4, self.num_out)
        return torch.cat([self.coefficients, pad], dim=0)

    def forward(self, r: torch.Tensor, split: Sequence[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """r: [E] distances, Å → [E, F] values (exactly 0 for r ≥ cutoff), or one [E, F_k] per ``split`` size.

        Splitting gathers each block separately, which is cheaper than slicing one [E, F] output under autograd.
        """
        rows, values = self.locate(r)
        table = self.table()
        values = values.to(table.dtype)
        if split is None:
            return spline_gather(values, rows, table)
        return [spline_gather(values, rows, block.contiguous()) for block in table.split(list(split), dim=1)]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, n_knots={self.n_knots}, num_out={self.num_out}"
