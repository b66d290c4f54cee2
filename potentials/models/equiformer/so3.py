"""Real spherical-harmonic bookkeeping, Wigner-D matrices and the per-edge frame rotation of eSCN.

Conventions (e3nn's): the coefficients of degree l sit at indices l² … l² + 2l in the order m = −l … l of a real
basis whose l = 1 block is Cartesian (x, y, z), so that D¹(R) = R.  The polar axis is **y**: a rotation about y mixes
only the pair (+m, −m) of each degree and leaves m = 0 alone.  Node features are tensors [N, (lmax+1)², C].

Edge frame.  For an edge vector r the rotation Q(r) maps r̂ onto ŷ.  It is built without angles — Rodrigues' formula
towards +ŷ or −ŷ, whichever is in r̂'s hemisphere, followed for −ŷ by a half turn about z —

    Q' = |c|·I + [k]ₓ + k kᵀ / (1 + |c|),   c = r̂·ŷ,  s = sign(c),  k = s·(r̂ × ŷ),   Q = diag(s, s, 1)·Q'

so every denominator is ≥ 1 and edges along ±y (or of zero length, which fall back to ŷ) are regular, also for
second derivatives.  Q is discontinuous where c changes sign, but only by a rotation about y (a "roll"), which every
operation done in the edge frame commutes with; that is the eSCN argument, and the tests check it numerically.

Wigner-D.  D^l(Q) is a polynomial in the entries of Q, computed by the recursion
D^l = (2l+1)·Cᵀ (D¹ ⊗ D^{l−1}) C with C = wigner_3j(1, l−1, l): no Euler angles, no singular points.

Edge layout.  In the edge frame only |m| ≤ mmax is kept, ordered "m-major": all l for m = 0, then for each
k = 1 … mmax the block (+k; l = k … lmax) followed by (−k; l = k … lmax).  ``EdgeLayout`` holds that order.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from potentials.nn.irreps import num_coefficients


class EdgeLayout:
    """The coefficients kept in the edge frame (|m| ≤ mmax), in m-major order.

    Attributes:
        lmax, mmax: maximum degree and order.
        rows: list of (l, m) per kept coefficient, length R.
        full_index: [R] long, position of each kept coefficient in the l-major layout (l² + l + m).
        m_sizes: number of degrees per order k = 0 … mmax, lmax + 1 − k.
    """

    def __init__(self, lmax: int, mmax: int) -> None:
        if lmax < 0 or not 0 <= mmax <= lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        self.lmax, self.mmax = int(lmax), int(mmax)
        rows = [(l, 0) for l in range(lmax + 1)]
        for k in range(1, mmax + 1):
            rows += [(l, k) for l in range(k, lmax + 1)]
            rows += [(l, -k) for l in range(k, lmax + 1)]
        self.rows = rows
        self.full_index = torch.tensor([l * l + l + m for l, m in rows], dtype=torch.long)
        self.m_sizes = [lmax + 1 - k for k in range(mmax + 1)]

    @property
    def num_rows(self) -> int:
        """R, the number of kept coefficients."""
        return len(self.rows)

    def block(self, k: int) -> tuple[int, int]:
        """(start, length) of order k's rows: m = 0 for k = 0, else both ±k (2·(lmax+1−k) rows)."""
        if k == 0:
            return 0, self.m_sizes[0]
        start = self.m_sizes[0] + 2 * sum(self.m_sizes[1:k])
        return start, 2 * self.m_sizes[k]


def edge_frame(edge_vec: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rotation matrices Q [E, 3, 3] with Q·r̂ = ŷ for every edge (zero-length edges get the identity frame).

    Args:
        edge_vec: [E, 3] edge vectors (any length unit).
        eps: squared length below which an edge is treated as zero-length.
    """
    r2 = (edge_vec * edge_vec).sum(-1, keepdim=True)
    ok = r2 > eps
    y = torch.zeros_like(edge_vec)
    y[:, 1] = 1.0
    u = torch.where(ok, edge_vec / torch.sqrt(torch.where(ok, r2, torch.ones_like(r2))), y)
    c = u[:, 1]
    s = torch.where(c >= 0, torch.ones_like(c), -torch.ones_like(c))
    ac = c.abs()
    k0, k2 = -s * u[:, 2], s * u[:, 0]  # k = s·(r̂ × ŷ) = s·(−u_z, 0, u_x)
    inv = 1.0 / (1.0 + ac)
    q = torch.stack(
        [
            ac + k0 * k0 * inv, -k2, k0 * k2 * inv,
            k2, ac, -k0,
            k0 * k2 * inv, k0, ac + k2 * k2 * inv,
        ],
        dim=-1,
    ).view(edge_vec.shape[0], 3, 3)
    flip = torch.stack([s, s, torch.ones_like(s)], dim=-1).unsqueeze(-1)  # diag(s, s, 1) on the rows
    return q * flip


def wigner_cg_tables(lmax: int) -> list[torch.Tensor]:
    """[√(2l+1)·C_l] for l = 2 … lmax with C_l = wigner_3j(1, l−1, l) [3, 2l−1, 2l+1], float64."""
    return [math.sqrt(2 * l + 1) * o3.wigner_3j(1, l - 1, l, dtype=torch.float64) for l in range(2, lmax + 1)]


def wigner_blocks(rot: torch.Tensor, lmax: int, tables: list[torch.Tensor]) -> list[torch.Tensor]:
    """Wigner-D blocks D^l(rot) [E, 2l+1, 2l+1], l = 0 … lmax, of rotation matrices ``rot`` [E, 3, 3].

    ``tables`` comes from :func:`wigner_cg_tables` (cast to ``rot``'s dtype and device).
    """
    blocks = [torch.ones_like(rot[:, :1, :1]), rot]
    for l in range(2, lmax + 1):
        cg = tables[l - 2]  # [a, m, M] (a: l=1, m: l-1, M: l)
        # D^l_MN = Σ cg[a,m,M] cg[b,n,N] R_ab D^{l-1}_mn, contracted one index at a time
        t = torch.einsum("emn,bnN->embN", blocks[-1], cg)
        t = torch.einsum("eab,embN->eamN", rot, t)
        blocks.append(torch.einsum("amM,eamN->eMN", cg, t))
    return blocks[: lmax + 1]


class EdgeRotation(nn.Module):
    """Per-edge matrices that rotate node coefficients into the edge frame, keeping |m| ≤ mmax.

    ``forward(edge_vec)`` returns ``rot`` [E, R, (lmax+1)²] (block-diagonal in l, rows in :class:`EdgeLayout` order):
    ``bmm(rot, x[src])`` gives the edge-frame coefficients [E, R, C] and ``bmm(rot.transpose(1, 2), y)`` takes
    edge-frame coefficients back to the global frame (zeros in the dropped |m| > mmax components).
    """

    def __init__(self, lmax: int, mmax: int) -> None:
        super().__init__()
        self.lmax, self.mmax = int(lmax), int(mmax)
        self.layout = EdgeLayout(lmax, mmax)
        for l, table in enumerate(wigner_cg_tables(lmax), start=2):
            self.register_buffer(f"cg_{l}", table, persistent=False)
        n_full = num_coefficients(lmax)
        offsets = [0]
        for l in range(lmax + 1):
            offsets.append(offsets[-1] + (2 * l + 1) ** 2)
        src, dst = [], []
        for r, (l, m) in enumerate(self.layout.rows):
            for n in range(2 * l + 1):
                src.append(offsets[l] + (l + m) * (2 * l + 1) + n)
                dst.append(r * n_full + l * l + n)
        self.register_buffer("src_index", torch.tensor(src, dtype=torch.long), persistent=False)
        self.register_buffer("dst_index", torch.tensor(dst, dtype=torch.long), persistent=False)

    def forward(self, edge_vec: torch.Tensor) -> torch.Tensor:
        """edge_vec [E, 3] → rotation-and-truncation matrices [E, R, (lmax+1)²] in edge_vec's dtype."""
        q = edge_frame(edge_vec)
        tables = [getattr(self, f"cg_{l}").to(q.dtype) for l in range(2, self.lmax + 1)]
        blocks = wigner_blocks(q, self.lmax, tables)
        flat = torch.cat([b.reshape(b.shape[0], b.shape[1] * b.shape[2]) for b in blocks], dim=1)
        n_rows, n_full = self.layout.num_rows, num_coefficients(self.lmax)
        out = flat.new_zeros(flat.shape[0], n_rows * n_full)
        out = out.index_copy(1, self.dst_index, flat.index_select(1, self.src_index))
        return out.view(flat.shape[0], n_rows, n_full)
