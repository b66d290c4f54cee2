"""Structure relaxation with ASE optimisers (positions, and the cell through FrechetCellFilter).

Many structures at once, one model call per step for a whole batch: :mod:`potentials.batch_relax`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import ase
import numpy as np
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}


@dataclass
class RelaxResult:
    """Outcome of one relaxation (energies eV, fmax eV/Å)."""

    converged: bool
    steps: int
    initial_energy: float
    final_energy: float
    initial_fmax: float
    final_fmax: float
    atoms: ase.Atoms
    #: for a model with uncertainty: the maximum per-atom force std along the path, the flagged steps
    #: (:meth:`potentials.uncertainty.UncertaintyWatch.summary`) and ``stopped_at_step``; empty otherwise
    uncertainty: dict[str, Any] = field(default_factory=dict)


def check_structure(atoms: ase.Atoms, potential=None, *, cell: bool = False) -> None:
    """Raise :class:`~potentials.errors.PotentialsInputError` (a ``ValueError``) if ``atoms`` cannot be relaxed:
    no atoms, ``cell`` on a structure not periodic in all three directions, and, given the ``potential``, elements
    it was not trained on or atoms closer than :data:`~potentials.graph.MIN_DISTANCE` (overlapping)."""
    from potentials.errors import PotentialsInputError
    from potentials.graph import AtomicGraph

    if not len(atoms):
        raise PotentialsInputError("the structure has no atoms")
    if cell and not np.all(atoms.pbc):
        raise PotentialsInputError("--cell relaxes the lattice and needs a structure periodic in all three "
                                   "directions")
    if potential is not None:
        graph = AtomicGraph.from_atoms(atoms, potential.cutoff)
        potential.check_elements(graph.z)
        graph.check_distances("structure")


def _fmax(obj) -> float:
    return float(np.sqrt((obj.get_forces() ** 2).sum(axis=1)).max()) if len(obj) else 0.0


def relax(
    atoms: ase.Atoms,
    calc,
    *,
    fmax: float = 0.05,
    steps: int = 500,
    optimizer: str = "FIRE",
    cell: bool = False,
    trajectory: str | os.PathLike | None = None,
    logfile: str | None = None,
    max_uncertainty: float | None = None,
    stop_on_uncertainty: bool = False,
    uncertainty_log: str | os.PathLike | None = None,
) -> RelaxResult:
    """Relax ``atoms`` (a copy) with ``calc`` until every force (and, with ``cell``, stress term) is below ``fmax``.

    Args:
        atoms: the structure; not modified.
        calc: an ASE calculator (e.g. :class:`~potentials.calculator.PotentialCalculator`).
        fmax: convergence threshold, eV/Å.
        steps: maximum optimiser steps.
        optimizer: FIRE, BFGS or LBFGS.
        cell: also relax the cell (needs a fully periodic structure).
            Bad input raises :class:`~potentials.errors.PotentialsInputError` (see :func:`check_structure`).
        trajectory: ASE .traj file to write the path to.
        logfile: optimiser log (None: silent, "-": stdout).
        max_uncertainty, stop_on_uncertainty, uncertainty_log: as in :func:`potentials.md.run_md` (every step is
            logged); a stopped relaxation is not converged.
    """
    name = optimizer.upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    check_structure(atoms, getattr(calc, "potential", None), cell=cell)
    atoms = atoms.copy()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if cell else atoms
    e0, f0 = atoms.get_potential_energy(), _fmax(target)
    from potentials.uncertainty import UncertaintyExceeded, UncertaintyWatch

    watch = UncertaintyWatch(atoms, calc, log=uncertainty_log, interval=1, threshold=max_uncertainty,
                             stop=stop_on_uncertainty)
    opt = OPTIMIZERS[name](target, trajectory=None if trajectory is None else str(trajectory), logfile=logfile)
    opt.insert_observer(watch, interval=1)  # before the trajectory writer: its frames carry the flag
    stopped = None
    try:
        converged = bool(opt.run(fmax=fmax, steps=steps))
    except UncertaintyExceeded as exceeded:
        converged, stopped = False, exceeded.step
        writer = getattr(opt, "trajectory", None)
        if callable(writer):
            writer()  # the frame that stopped the run (the watch runs before the trajectory writer)
    finally:
        watch.close()
    uncertainty = {**watch.summary(), "stopped_at_step": stopped} if watch.values else {}
    return RelaxResult(converged, int(opt.nsteps), float(e0), float(atoms.get_potential_energy()), f0,
                       _fmax(target), atoms, uncertainty)
