"""Neighbour-list timing: this project's vesin-based builder against ASE and matscipy.

Structures are Cu fcc cells (a = 3.61 Å) from 2 to 4000 atoms; cutoff 5 Å; full lists with periodic images.
Each builder's edge count is checked against ASE's so that a faster but wrong list cannot win.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ase
import numpy as np
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list

from benchmarks.structures import cu_supercell

CUTOFF = 5.0


def _ours() -> Callable[[ase.Atoms, float], int]:
    """``potentials.neighbors.neighbor_list`` (vesin inside); vesin directly if the module is absent."""
    try:
        from potentials.neighbors import neighbor_list
    except ImportError:
        return _vesin_raw

    def ours(atoms: ase.Atoms, cutoff: float) -> int:
        edge_index, _ = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
        return int(edge_index.shape[1])

    return ours


def _ase(atoms: ase.Atoms, cutoff: float) -> int:
    i, _, _ = ase_neighbor_list("ijS", atoms, cutoff)
    return len(i)


def _matscipy() -> Callable[[ase.Atoms, float], int] | None:
    try:
        from matscipy.neighbours import neighbour_list
    except ImportError:
        return None

    def run(atoms: ase.Atoms, cutoff: float) -> int:
        i, _, _ = neighbour_list("ijS", atoms, cutoff)
        return len(i)

    return run


def _vesin_raw(atoms: ase.Atoms, cutoff: float) -> int:
    """vesin alone, without the sorting and dtype handling of the project's wrapper."""
    from vesin import NeighborList

    i, _, _ = NeighborList(cutoff=cutoff, full_list=True).compute(
        points=atoms.positions, box=atoms.cell.array, periodic=atoms.pbc, quantities="ijS")
    return len(i)


def builders() -> dict[str, Callable[[ase.Atoms, float], int]]:
    """Name → function(atoms, cutoff) returning the number of directed edges."""
    out = {"ours": _ours(), "vesin (raw)": _vesin_raw, "ase": _ase}
    ms = _matscipy()
    if ms is not None:
        out["matscipy"] = ms
    return out


def cu_cells(max_atoms: int = 4000) -> list[ase.Atoms]:
    """Cu fcc cells of 2, 4, 32, 108, ... atoms up to ``max_atoms`` (2 = primitive cell doubled)."""
    cells = [bulk("Cu", "fcc", a=3.61).repeat((2, 1, 1))]
    n = 1
    while 4 * n ** 3 <= max_atoms:
        cells.append(cu_supercell(n))
        n = n + 1 if n < 2 else n + (1 if n < 8 else 2)
    return cells


def time_call(fn: Callable[[], object], min_time: float = 0.2, max_reps: int = 200) -> float:
    """Median seconds of ``fn`` over repeats filling about ``min_time`` seconds (at least 3 repeats)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(max_atoms: int = 4000, cutoff: float = CUTOFF, min_time: float = 0.2) -> list[dict]:
    """Rows ``{"n_atoms", "n_edges", "<builder>_ms": ...}``; raises if a builder's edge count disagrees with ASE."""
    funcs = builders()
    rows = []
    for atoms in cu_cells(max_atoms):
        reference = _ase(atoms, cutoff)
        row: dict = {"n_atoms": len(atoms), "n_edges": reference}
        for name, fn in funcs.items():
            count = fn(atoms, cutoff)
            if count != reference:
                raise RuntimeError(f"{name} found {count} edges for {len(atoms)} Cu atoms, ASE found {reference}")
            row[f"{name}_ms"] = 1e3 * time_call(lambda fn=fn, atoms=atoms: fn(atoms, cutoff), min_time)
        rows.append(row)
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
