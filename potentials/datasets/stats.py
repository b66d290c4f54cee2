"""Dataset statistics used to initialise a Potential: reference energies, force RMS, average neighbour count."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class DatasetStats:
    """Statistics of a training split.

    Attributes:
        atomic_energies: per-element reference energies E0[z] (eV), least-squares fit of total energies to counts.
        force_rms: root mean square of force components (eV/Å); the Potential's energy scale.
        avg_num_neighbors: mean number of neighbours per atom within the cutoff.
        num_structures: structures in the split.
        num_atoms: atoms in the split.
        elements: atomic numbers present.
        energy_rmse_after_refs: RMS per-atom residual of the reference-energy fit (eV/atom), a sanity figure.
    """

    atomic_energies: dict[int, float] = field(default_factory=dict)
    force_rms: float = 1.0
    avg_num_neighbors: float = 1.0
    num_structures: int = 0
    num_atoms: int = 0
    elements: list[int] = field(default_factory=list)
    energy_rmse_after_refs: float = math.nan

    def to_dict(self) -> dict:
        d = asdict(self)
        d["atomic_energies"] = {int(k): float(v) for k, v in self.atomic_energies.items()}
        return d


def fit_atomic_energies(counts: np.ndarray, energies: np.ndarray, elements: list[int]) -> tuple[dict, float]:
    """Least-squares E0 with Σ_z n_z E0[z] ≈ E per structure.

    Args:
        counts: [S, K] number of atoms of each of the K ``elements`` per structure.
        energies: [S] total energies, eV.
        elements: the K atomic numbers.

    Returns:
        (E0 as {z: eV}, RMS residual per atom in eV/atom). Rank-deficient cases (e.g. one composition) get the
        minimum-norm solution, which still reproduces the mean energy.
    """
    if len(energies) == 0:
        return {z: 0.0 for z in elements}, math.nan
    e0, *_ = np.linalg.lstsq(counts.astype(np.float64), energies.astype(np.float64), rcond=None)
    resid = (energies - counts @ e0) / counts.sum(axis=1)
    return {int(z): float(e) for z, e in zip(elements, e0, strict=True)}, float(np.sqrt(np.mean(resid**2)))


def compute_stats(graphs: Iterable) -> DatasetStats:
    """One pass over graphs (AtomicGraph objects with labels and masks) → :class:`DatasetStats`."""
    rows, energies, f2, nf, n_edges, n_atoms, n_struct = [], [], 0.0, 0, 0, 0, 0
    zs: set[int] = set()
    for g in graphs:
        z = g.z.numpy()
        zs.update(np.unique(z).tolist())
        n_struct += 1
        n_atoms += len(z)
        n_edges += int(g.edge_index.shape[1])
        if bool(g.has_energy):
            rows.append(np.bincount(z, minlength=119))
            energies.append(float(g.energy))
        if bool(g.has_forces):
            f = g.forces.double().numpy()
            f2 += float((f**2).sum())
            nf += f.size
    elements = sorted(zs)
    if rows:
        counts = np.stack(rows)[:, elements]
        e0, rmse = fit_atomic_energies(counts, np.asarray(energies), elements)
    else:
        e0, rmse = {z: 0.0 for z in elements}, math.nan
    return DatasetStats(
        atomic_energies=e0,
        force_rms=math.sqrt(f2 / nf) if nf else 1.0,
        avg_num_neighbors=n_edges / n_atoms if n_atoms else 1.0,
        num_structures=n_struct,
        num_atoms=n_atoms,
        elements=elements,
        energy_rmse_after_refs=rmse,
    )
