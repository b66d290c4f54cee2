"""Channel-wise tensor product of neighbour features with edge spherical harmonics (NequIP/SevenNet convolution).

For every edge (j → i) and every path (l1, l2 → l3) allowed by the triangle rule and parity
(l1 + l2 + l3 even, so every output keeps the natural parity (−1)^l3), the message is

    m^{(p)}_{l3 m3, c}(ij) = w^{(p)}_c(r_ij) · √(2l3+1) · Σ_{m1 m2} C^{l1 l2 l3}_{m1 m2 m3} x_{j,l1 m1,c} Y_{l2 m2}(r̂)

with C the real Clebsch–Gordan (Wigner 3j) coefficients of e3nn and w^{(p)}_c(r) one learnable radial function per
path and channel.  This is e3nn's ``TensorProduct`` in "uvu" mode with per-edge weights, written by hand for
speed: with e3nn's coefficients, three kinds of path are a multiple of the identity and need no contraction at
all (checked when the module is built):

* l1 = 0 (l2 = l3):  m = Y_l3 ⊗ (w x_0)          an outer product
* l2 = 0 (l1 = l3):  m = w x_l1                    a scaling
* l3 = 0 (l1 = l2):  m = w (x_l1 · Y_l1)/√(2l1+1)  a dot product over m

Every path of an lmax = 1 model is one of these.  The others (all three degrees > 0) contract the precomputed
coefficients with Y per edge, ``A = Y_l2 @ C`` [E, 2l1+1, 2l3+1], then apply it with one batched matmul.
No Python loop runs over edges or m indices.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn


def tensor_product_paths(lmax_in: int, lmax_sh: int, lmax_out: int) -> list[tuple[int, int, int]]:
    """Paths (l1, l2, l3) with |l1−l2| ≤ l3 ≤ l1+l2, l3 ≤ lmax_out and l1+l2+l3 even, sorted by (l3, l1, l2)."""
    return [
        (l1, l2, l3)
        for l3 in range(lmax_out + 1)
        for l1 in range(lmax_in + 1)
        for l2 in range(lmax_sh + 1)
        if abs(l1 - l2) <= l3 <= l1 + l2 and (l1 + l2 + l3) % 2 == 0
    ]


def _path_coefficients(l1: int, l2: int, l3: int) -> torch.Tensor:
    """√(2l3+1)·C^{l1 l2 l3} as [2l1+1, 2l2+1, 2l3+1], float64."""
    return math.sqrt(2 * l3 + 1) * o3.wigner_3j(l1, l2, l3, dtype=torch.float64)


class EdgeTensorProduct(nn.Module):
    """Per-edge channel-wise tensor product of gathered features [E, D_in, C] with Y(r̂) [E, D_sh].

    Args:
        lmax_in: highest degree of the input features.
        lmax_sh: highest degree of the edge spherical harmonics.
        lmax_out: highest degree produced.

    Attributes:
        paths: the (l1, l2, l3) paths, in the order of the radial weights and of the outputs.
    """

    def __init__(self, lmax_in: int, lmax_sh: int, lmax_out: int) -> None:
        super().__init__()
        self.lmax_in, self.lmax_sh, self.lmax_out = int(lmax_in), int(lmax_sh), int(lmax_out)
        self.paths = tensor_product_paths(lmax_in, lmax_sh, lmax_out)
        for l3 in range(lmax_out + 1):
            if not any(p[2] == l3 for p in self.paths):
                raise ValueError(f"no tensor-product path reaches l3={l3} from lmax_in={lmax_in}, "
                                 f"lmax_sh={lmax_sh}; raise lmax_sh")
        self.kinds: list[str] = []
        self.scales: list[float] = []
        for k, (l1, l2, l3) in enumerate(self.paths):
            coeff = _path_coefficients(l1, l2, l3)
            kind, scale = "general", 1.0
            if 0 in (l1, l2, l3):
                kind = "outer" if l1 == 0 else ("scale" if l2 == 0 else "dot")
                eye = torch.eye(2 * max(l1, l2, l3) + 1, dtype=torch.float64)
                flat = coeff.reshape(eye.shape)
                scale = float(flat[0, 0])
                scale = 1.0 if abs(scale - 1.0) < 1e-12 else scale
                if not torch.allclose(flat, scale * eye, atol=1e-12):
                    raise RuntimeError(f"unexpected Clebsch-Gordan structure for path {(l1, l2, l3)}")
            else:
                # [2l2+1, (2l1+1)(2l3+1)]: contracted with Y_l2 per edge
                self.register_buffer(f"cg_{k}", coeff.permute(1, 0, 2).reshape(2 * l2 + 1, -1))
            self.kinds.append(kind)
            self.scales.append(scale)

    @property
    def num_paths(self) -> int:
        return len(self.paths)

    def forward(self, x_j: list[torch.Tensor], sh: list[torch.Tensor], weights: list[torch.Tensor]
                ) -> list[torch.Tensor]:
        """Messages of every path.

        Args:
            x_j: features of the source atom of each edge, per degree l1: [E, C] for l1 = 0, else [E, 2l1+1, C]
                (gathered per degree so that autograd never slices an edge-sized tensor).
            sh: spherical harmonics of the edge direction (component normalisation), per degree l2: [E, 2l2+1],
                contiguous (broadcasting a strided slice is several times slower on CPU).
            weights: per path, [E, C] radial weights.

        Returns:
            per path, [E, 2l3+1, C] messages.
        """
        out = []
        for k, (l1, l2, l3) in enumerate(self.paths):
            w, kind, scale = weights[k], self.kinds[k], self.scales[k]
            if kind == "outer":
                u = w * x_j[0] if scale == 1.0 else (w * scale) * x_j[0]
                msg = u.unsqueeze(1) if l3 == 0 else sh[l2].unsqueeze(-1) * u.unsqueeze(1)
            elif kind == "scale":
                msg = (w if scale == 1.0 else w * scale).unsqueeze(1) * x_j[l1]
            elif kind == "dot":
                dot = (x_j[l1] * sh[l2].unsqueeze(-1)).sum(1)
                msg = ((w * scale) * dot).unsqueeze(1)
            else:
                cg = getattr(self, f"cg_{k}").to(w.dtype)
                a = (sh[l2] @ cg).view(-1, 2 * l1 + 1, 2 * l3 + 1)
                msg = torch.bmm(a.transpose(1, 2), x_j[l1]) * w.unsqueeze(1)
            out.append(msg)
        return out
