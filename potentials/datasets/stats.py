"""Dataset statistics used to initialise a Potential: reference energies, force RMS, average neighbour count."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

#: Element-count columns: atomic numbers 0..118.
_MAX_Z = 119


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


class StreamingLeastSquares:
    """The triangular factor R of a tall matrix [A | b], accumulated a block of rows at a time.

    ``||A x - b||² = ||R [x; -1]||²`` for every x, so least squares over millions of rows needs only the
    (K+1)×(K+1) factor: memory does not grow with the number of rows, and QR keeps the fit as stable as a
    direct ``lstsq`` on A.

    Args:
        k: number of unknowns (columns of A).
        block: rows buffered before each QR update.
    """

    def __init__(self, k: int, block: int = 4096) -> None:
        self.r = np.zeros((0, k + 1))
        self.rows: list[np.ndarray] = []
        self.block = block

    def add(self, a: np.ndarray, b: float, weight: float | None = None) -> None:
        """One row: coefficients ``a`` [K] and target ``b``; ``weight`` w ≥ 0 makes it count w times in the sum of
        squares (the row is scaled by √w); None: weight 1, the row as given."""
        row = np.append(np.asarray(a, dtype=np.float64), b)
        if weight is not None:
            row *= math.sqrt(weight)
        self.rows.append(row)
        if len(self.rows) >= self.block:
            self._update()

    def _update(self) -> None:
        if self.rows:
            self.r = np.linalg.qr(np.vstack([self.r, np.stack(self.rows)]), mode="r")
            self.rows.clear()

    def factor(self) -> np.ndarray:
        """R [min(rows, K+1), K+1]."""
        self._update()
        return self.r


def compute_stats(graphs: Iterable, baseline: Callable | None = None, weights: Iterable[float] | None = None
                  ) -> DatasetStats:
    """One streaming pass over graphs (AtomicGraph objects with labels and masks) → :class:`DatasetStats`.

    Memory stays constant however many graphs there are: the reference-energy fit accumulates QR factors
    (:class:`StreamingLeastSquares`) of the per-structure element counts, once plain and once divided by the
    number of atoms (for the per-atom residual).

    Args:
        graphs: the training split.
        baseline: ``graph → (energy eV, forces [N, 3] eV/Å)`` of terms added to the network's energy (the physics
            terms of :mod:`potentials.physics`); the statistics are those of the labels minus the baseline, i.e.
            of what the network learns.
        weights: one weight per graph, in the order of ``graphs``, for the reference-energy fit (weighted least
            squares) and its residual figure; a mix (:mod:`potentials.datasets.mix`) passes its sampling weights so
            the fit sees each dataset in the proportion training draws it. None: every structure counts once.
            Force scale and neighbour count stay plain averages over the structures.
    """
    fit, per_atom = StreamingLeastSquares(_MAX_Z), StreamingLeastSquares(_MAX_Z)
    f2, nf, n_edges, n_atoms, n_struct, n_energy = 0.0, 0, 0, 0, 0, 0
    present = np.zeros(_MAX_Z, dtype=bool)
    weight_iter = None if weights is None else iter(weights)
    w_energy = 0.0  # sum of the weights of the energy rows (weighted runs only)
    for g in graphs:
        w = None if weight_iter is None else next(weight_iter, None)
        if weight_iter is not None and w is None:
            raise ValueError(f"compute_stats: fewer weights than structures (structure {n_struct} has none)")
        z = g.z.numpy()
        counts = np.bincount(z, minlength=_MAX_Z).astype(np.float64)
        present |= counts > 0
        n_struct += 1
        n_atoms += len(z)
        n_edges += int(g.edge_index.shape[1])
        base_e, base_f = baseline(g) if baseline is not None else (0.0, 0.0)
        if bool(g.has_energy):
            energy = float(g.energy) - base_e
            fit.add(counts, energy, None if w is None else float(w))
            per_atom.add(counts / len(z), energy / len(z), None if w is None else float(w))
            n_energy += 1
            w_energy += 1.0 if w is None else float(w)
        if bool(g.has_forces):
            f = g.forces.double().numpy() - base_f
            f2 += float((f**2).sum())
            nf += f.size
    elements = np.flatnonzero(present).tolist()
    if n_energy:
        r = fit.factor()
        e0, *_ = np.linalg.lstsq(r[:, elements], r[:, -1], rcond=None)
        x = np.zeros(_MAX_Z + 1)
        x[elements], x[-1] = e0, -1.0
        norm = n_energy if weights is None else w_energy
        rmse = float(np.linalg.norm(per_atom.factor() @ x) / math.sqrt(norm)) if norm > 0 else math.nan
        atomic_energies = {int(z): float(e) for z, e in zip(elements, e0, strict=True)}
    else:
        atomic_energies, rmse = {z: 0.0 for z in elements}, math.nan
    return DatasetStats(
        atomic_energies=atomic_energies,
        force_rms=math.sqrt(f2 / nf) if nf else 1.0,
        avg_num_neighbors=n_edges / n_atoms if n_atoms else 1.0,
        num_structures=n_struct,
        num_atoms=n_atoms,
        elements=elements,
        energy_rmse_after_refs=rmse,
    )
