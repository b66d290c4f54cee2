"""Relax many structures at once: one model call per optimiser step for a whole batch of structures.

Each structure keeps its own FIRE state (time step, mixing, velocities), step count and convergence test, exactly
as ASE's :class:`~ase.optimize.FIRE` does for one structure, so a batched relaxation follows the same path as the
one-by-one relaxation of :func:`potentials.relax.relax` up to floating-point differences. With ``cell=True`` the
degrees of freedom are those of ASE's :class:`~ase.filters.FrechetCellFilter`: positions in the undeformed cell
plus ``N·log F`` for the deformation gradient ``F`` of the cell, whose force is the adjoint Fréchet derivative of
the matrix exponential applied to the virial.

Batches are filled in flight: when a structure converges (or runs out of steps) it leaves the batch and the next
waiting structures that fit (``batch_size`` structures, ``max_atoms`` atoms) join it at the next step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ase
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.trajectory import Trajectory
from ase.stress import full_3x3_to_voigt_6_stress
from scipy.linalg import expm, expm_frechet

from potentials.batching import evaluate, first_fit, structure_graph
from potentials.errors import PotentialsInputError
from potentials.graph import _fixed_mask
from potentials.potential import Potential
from potentials.relax import RelaxResult, check_structure

#: ASE's FIRE defaults (ase.optimize.FIRE): the batched optimiser takes the same steps.
FIRE_DEFAULTS = {"dt": 0.1, "maxstep": 0.2, "dtmax": 1.0, "nmin": 5, "finc": 1.1, "fdec": 0.5, "astart": 0.1,
                 "fa": 0.99}


@dataclass
class _Fire:
    """One structure's FIRE state; :meth:`step` is ASE's FIRE.step on a flat vector of degrees of freedom."""

    dt: float = FIRE_DEFAULTS["dt"]
    a: float = FIRE_DEFAULTS["astart"]
    n_positive: int = 0
    v: np.ndarray | None = None

    def step(self, x: np.ndarray, f: np.ndarray) -> np.ndarray:
        p = FIRE_DEFAULTS
        if self.v is None:
            self.v = np.zeros_like(x)
        else:
            vf = float(np.vdot(f, self.v))
            if vf > 0.0:
                self.v = (1.0 - self.a) * self.v + self.a * f / np.sqrt(np.vdot(f, f)) * np.sqrt(
                    np.vdot(self.v, self.v))
                if self.n_positive > p["nmin"]:
                    self.dt = min(self.dt * p["finc"], p["dtmax"])
                    self.a *= p["fa"]
                self.n_positive += 1
            else:
                self.v[:] = 0.0
                self.a = p["astart"]
                self.dt *= p["fdec"]
                self.n_positive = 0
        self.v += self.dt * f
        dr = self.dt * self.v
        norm = float(np.sqrt(np.vdot(dr, dr)))
        if norm > p["maxstep"]:
            dr = p["maxstep"] * dr / norm
        return x + dr


@dataclass
class _Relaxation:
    """One structure in flight: its degrees of freedom (positions, and ``N·log F`` with the cell) and FIRE state."""

    index: int
    atoms: ase.Atoms
    cell: bool
    x: np.ndarray  # [n (+3), 3]: positions (in the undeformed cell with ``cell``), then the cell rows
    fixed: np.ndarray
    fire: _Fire = field(default_factory=_Fire)
    steps: int = 0
    initial: tuple[float, float] | None = None
    trajectory: Trajectory | None = None

    @property
    def n(self) -> int:
        return len(self.atoms)

    def deformation(self) -> np.ndarray:
        return expm(self.x[self.n:] / self.n) if self.cell else np.eye(3)

    def geometry(self) -> tuple[np.ndarray, np.ndarray]:
        """Cartesian positions and cell of the current degrees of freedom."""
        if not self.cell:
            return self.x, self.atoms.cell.array
        f = self.deformation()
        return self.x[: self.n] @ f.T, self.atoms.cell.array @ f.T

    def generalized_forces(self, forces: np.ndarray, stress: np.ndarray | None) -> np.ndarray:
        """Forces on the degrees of freedom (FrechetCellFilter.get_forces with ``cell``)."""
        forces = np.where(self.fixed[:, None], 0.0, forces)
        if not self.cell:
            return forces
        f = self.deformation()
        cell = self.atoms.cell.array @ f.T
        virial = -abs(np.linalg.det(cell)) * stress
        cell_grad = virial @ np.linalg.inv(f.T)
        # <L(A, E), G> = <E, L(Aᵀ, G)>: one Fréchet derivative instead of one per strain direction
        log_force = expm_frechet((self.x[self.n:] / self.n).T, cell_grad, compute_expm=False)
        return np.concatenate([forces @ f, log_force / self.n])


def relax_many(
    structures: Sequence[ase.Atoms],
    potential: Potential,
    *,
    fmax: float = 0.05,
    steps: int = 500,
    cell: bool = False,
    batch_size: int = 32,
    max_atoms: int | None = None,
    trajectories: Sequence[str | os.PathLike | None] | None = None,
    on_done: Callable[[int, RelaxResult | PotentialsInputError], None] | None = None,
) -> list[RelaxResult | PotentialsInputError]:
    """Relax every structure with FIRE, ``batch_size`` structures (at most ``max_atoms`` atoms) per model call.

    Args:
        structures: the structures; not modified.
        potential: the model, already on its device and in its dtype (e.g. ``PotentialCalculator(...).potential``).
        fmax: convergence threshold, eV/Å (on the cell rows of the Fréchet filter too, with ``cell``).
        steps: maximum optimiser steps per structure.
        cell: also relax the cell (structures must be periodic in all three directions).
        batch_size: most structures in one model call.
        max_atoms: most atoms in one model call (a structure larger than this runs alone); None: no limit.
        trajectories: an ASE .traj path (or None) per structure, written at every step as ASE's optimisers do.
        on_done: called with (index, result) as each structure finishes.

    Returns:
        Per structure, in input order, a :class:`~potentials.relax.RelaxResult` or the
        :class:`~potentials.errors.PotentialsInputError` that rejected it (unknown element, overlapping atoms,
        a non-periodic structure with ``cell``, non-finite forces); the others are relaxed regardless.
    """
    if batch_size < 1 or (max_atoms is not None and max_atoms < 1):
        raise ValueError("batch_size and max_atoms must be positive")
    dtype = next(iter(potential.buffers())).dtype
    results: list[RelaxResult | PotentialsInputError | None] = [None] * len(structures)
    limit = max_atoms if max_atoms is not None else float("inf")

    def finish(job: _Relaxation | int, result: RelaxResult | PotentialsInputError) -> None:
        index = job if isinstance(job, int) else job.index
        if isinstance(job, _Relaxation) and job.trajectory is not None:
            job.trajectory.close()
        results[index] = result
        if on_done is not None:
            on_done(index, result)

    def start(index: int) -> _Relaxation | None:
        atoms = structures[index]
        try:
            check_structure(atoms, potential, cell=cell)
        except ValueError as err:
            finish(index, err if isinstance(err, PotentialsInputError) else PotentialsInputError(str(err)))
            return None
        atoms = atoms.copy()
        atoms.calc = None
        x = atoms.positions.copy()
        if cell:
            x = np.concatenate([x, np.zeros((3, 3))])
        path = trajectories[index] if trajectories is not None else None
        traj = Trajectory(str(path), "w") if path is not None else None
        return _Relaxation(index, atoms, cell, x, _fixed_mask(atoms), trajectory=traj)

    pending = list(range(len(structures)))
    sizes = [len(a) for a in structures]
    active: list[_Relaxation] = []
    while pending or active:
        while admitted := first_fit(pending, sizes, len(active), sum(job.n for job in active), batch_size, limit):
            taken = set(admitted)
            pending = [i for i in pending if i not in taken]
            started = [job for job in map(start, admitted) if job is not None]
            active += started
            if len(started) == len(admitted):
                break  # else rejected structures left room for more
        if not active:
            continue
        geometries, graphs, kept = [], [], []
        for job in active:
            pos, c = job.geometry()
            try:  # a cell deformed beyond what the neighbour search accepts ends that structure only
                graphs.append(structure_graph(pos, c, job.atoms, potential.cutoff, dtype))
            except ValueError as err:
                finish(job, PotentialsInputError(f"step {job.steps}: {err}"))
                continue
            geometries.append((pos, c))
            kept.append(job)
        active = kept
        if not active:
            continue
        need_stress = cell or any(bool(np.all(job.atoms.pbc)) for job in active)
        out = evaluate(potential, graphs, stress=need_stress)
        still = []
        for b, (job, (pos, c)) in enumerate(zip(active, geometries, strict=True)):
            f_atoms = out.forces[out.atoms_of(b)]
            periodic = bool(np.all(job.atoms.pbc))
            stress = out.stress[b] if out.stress is not None and periodic else None
            energy = float(out.energy[b])
            if not (np.isfinite(energy) and np.isfinite(f_atoms).all()):
                finish(job, PotentialsInputError(f"non-finite energy or forces at step {job.steps}"))
                continue
            g = job.generalized_forces(f_atoms, stress)
            fm = float(np.sqrt((g ** 2).sum(axis=1)).max())
            if job.initial is None:
                job.initial = (energy, fm)
            snapshot = None
            if job.trajectory is not None or fm < fmax or job.steps >= steps:
                snapshot = job.atoms.copy()
                snapshot.positions, snapshot.cell = pos, c
                results_kw = {"energy": energy, "forces": np.where(job.fixed[:, None], 0.0, f_atoms)}
                if stress is not None:
                    results_kw["stress"] = full_3x3_to_voigt_6_stress(stress)
                snapshot.calc = SinglePointCalculator(snapshot, **results_kw)
                if job.trajectory is not None:
                    job.trajectory.write(snapshot)
            if fm < fmax or job.steps >= steps:
                finish(job, RelaxResult(fm < fmax, job.steps, job.initial[0], energy, job.initial[1], fm, snapshot))
                continue
            job.x = job.fire.step(job.x, g)
            job.steps += 1
            still.append(job)
        active = still
    return results  # type: ignore[return-value]
