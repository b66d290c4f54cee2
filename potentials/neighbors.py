"""Periodic radius graphs built with vesin, and the edge vectors derived from them.

Convention (see :mod:`potentials.keys`): ``edge_index[0]`` is the neighbour ``j``, ``edge_index[1]`` the centre
``i``; ``edge_vec = pos[j] + cell_offsets @ cell - pos[i]``.  Every pair within the cutoff appears in both
directions, and an atom sees its own periodic images when the cell is smaller than the cutoff.
"""

from __future__ import annotations

import numpy as np
import torch
from vesin import NeighborList


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Full neighbour list within ``cutoff``.

    Args:
        positions: [N, 3] Cartesian positions, Å.
        cell: [3, 3] lattice vectors as rows, Å (ignored along non-periodic directions).
        pbc: [3] bool, periodic directions.
        cutoff: radius, Å (pairs with distance < cutoff are kept).

    Returns:
        ``edge_index`` [2, E] int64 (row 0 = neighbour j, row 1 = centre i), and ``cell_offsets`` [E, 3] int64,
        sorted by centre then neighbour.
    """
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if pbc.any():
        vol = abs(np.linalg.det(cell))
        if not np.isfinite(vol) or vol < 1e-6:
            raise ValueError(
                f"cell with periodic directions {pbc.tolist()} has zero volume ({vol:.3g} Å³); "
                "give three non-degenerate lattice vectors (non-periodic ones may be any vacuum length)"
            )
    else:
        cell = np.zeros((3, 3))
    if len(positions) == 0:
        return np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3), dtype=np.int64)
    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts = nl.compute(points=positions, box=cell, periodic=pbc, quantities="ijS")
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    shifts = shifts.astype(np.int64)
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    return np.stack([j[order], i[order]]), shifts[order]


def edge_vectors(
    pos: torch.Tensor,
    edge_index: torch.Tensor,
    cell_offsets: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edge vectors ``r_ij = pos[j] + offsets·cell − pos[i]`` (Å), differentiable in ``pos`` and ``cell``.

    Args:
        pos: [N, 3] positions, Å.
        edge_index: [2, E] (j, i).
        cell_offsets: [E, 3] integer images (any dtype).
        cell: [B, 3, 3] lattice vectors as rows, Å.
        batch: [N] structure index per atom (None for a single structure).

    Returns:
        [E, 3] edge vectors, Å.
    """
    j, i = edge_index[0], edge_index[1]
    graph_of_edge = batch[i] if batch is not None else torch.zeros_like(i)
    shift = torch.einsum("ea,eab->eb", cell_offsets.to(pos.dtype), cell[graph_of_edge])
    return pos[j] + shift - pos[i]
