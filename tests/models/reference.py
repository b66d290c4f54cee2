"""Reference quantities from e3nn that the model-component tests compare against."""

from __future__ import annotations

import torch
from e3nn import o3


def e3nn_wigner(lmax: int, rot: torch.Tensor) -> torch.Tensor:
    """e3nn's block-diagonal Wigner matrix D(rot) over l = 0..lmax with natural parity (det R)^l.

    Args:
        lmax: highest degree.
        rot: [3, 3] rotation (or improper rotation) matrix.

    Returns:
        [(lmax+1)², (lmax+1)²] in the dtype of ``rot``.
    """
    return torch.block_diag(*[o3.Irrep(l, (-1) ** l).D_from_matrix(rot) for l in range(lmax + 1)])
