"""Periodic radius graphs built with vesin, and the edge vectors derived from them.

Convention (see :mod:`potentials.keys`): ``edge_index[0]`` is the neighbour ``j``, ``edge_index[1]`` the centre
``i``; ``edge_vec = pos[j] + cell_offsets @ cell - pos[i]``.  Every pair within the cutoff appears in both
directions, and an atom sees its own periodic images when the cell is smaller than the cutoff.
"""

from __future__ import annotations

import numpy as np
import torch
from vesin import NeighborList

from potentials.errors import PotentialsInputError


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
    if not np.isfinite(positions).all() or (pbc.any() and not np.isfinite(cell).all()):
        raise PotentialsInputError("positions or cell hold NaN or inf values")
    if pbc.any():
        vol = abs(np.linalg.det(cell))
        if not np.isfinite(vol) or vol < 1e-6:
            raise PotentialsInputError(
                f"cell with periodic directions {pbc.tolist()} has zero volume ({vol:.3g} Å³); "
                "give three non-degenerate lattice vectors (non-periodic ones may be any vacuum length)"
            )
        _check_images(cell, pbc, cutoff)
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


#: Most periodic images of the cell a neighbour search may have to visit before it is refused.
MAX_IMAGES = 100_000


def _check_images(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    """Refuse nearly singular or extremely skewed cells, whose neighbour search would not finish.

    The distance between opposite faces of the cell along periodic direction k is h_k = V / |a_i × a_j|; a search
    within ``cutoff`` visits about Π_k (2·⌈cutoff / h_k⌉ + 1) periodic images of the cell.
    """
    volume = abs(np.linalg.det(cell))
    heights = np.array([volume / max(np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])), 1e-300)
                        for k in range(3)])
    images = np.prod([2 * np.ceil(cutoff / h) + 1 for h, periodic in zip(heights, pbc, strict=True) if periodic])
    if not np.isfinite(images) or images > MAX_IMAGES:
        thinnest = float(heights[pbc].min())
        raise PotentialsInputError(
            f"cell is nearly singular or very skewed: it is only {thinnest:.3g} Å thick along a periodic direction, "
            f"so a {cutoff} Å neighbour search would visit {images:.3g} periodic images; check the lattice vectors "
            "(a skewed cell can be reduced with ase.build.niggli_reduce)"
        )


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
    graph_of_edge = batch.index_select(0, i) if batch is not None else torch.zeros_like(i)
    # index_select rather than pos[j]: the backward pass (forces, stress) is then an index_add, not the CPU's much
    # slower accumulating index_put
    shift = torch.einsum("ea,eab->eb", cell_offsets.to(pos.dtype), cell.index_select(0, graph_of_edge))
    return pos.index_select(0, j) + shift - pos.index_select(0, i)
