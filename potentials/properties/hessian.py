"""The Hessian d²E/dr_i dr_j: a second autograd pass through a model, central differences for other calculators."""

from __future__ import annotations

from collections.abc import Sequence

import ase
import numpy as np


def hessian(atoms: ase.Atoms, calc=None, *, rows: Sequence[int] | None = None, delta: float = 1e-3,
            method: str = "auto") -> np.ndarray:
    """The Hessian of the energy with respect to the positions, eV/Å² (the positive-definite sign at a minimum).

    Args:
        atoms: the structure (not modified); the cell is held fixed.
        calc: an ASE calculator; default ``atoms.calc``.
        rows: atoms whose rows are wanted (default all): the result is [3·len(rows), 3N], row 3k+a being
            −∂F/∂r of atom ``rows[k]``, direction a.
        delta: displacement of the central differences, Å.
        method: ``"autograd"`` (a :class:`~potentials.calculator.PotentialCalculator` only: exact, forces
            differentiated once more), ``"differences"`` (central differences of the forces, any calculator:
            6·len(rows) force evaluations) or ``"auto"`` (autograd where possible).
    """
    calc = atoms.calc if calc is None else calc
    if calc is None:
        raise ValueError("hessian needs a calculator: pass calc= or attach one to the atoms")
    rows = list(range(len(atoms))) if rows is None else [int(i) for i in rows]
    if method not in ("auto", "autograd", "differences"):
        raise ValueError(f"method must be auto, autograd or differences, got {method!r}")
    if method != "differences":
        from potentials.calculator import PotentialCalculator

        if isinstance(calc, PotentialCalculator):
            return _autograd(atoms, calc, rows)
        if method == "autograd":
            raise ValueError(f"an autograd Hessian needs a PotentialCalculator, got {type(calc).__name__}")
    return _differences(atoms, calc, rows, delta)


def _differences(atoms: ase.Atoms, calc, rows: list[int], delta: float) -> np.ndarray:
    atoms = atoms.copy()
    atoms.calc = calc
    out = np.empty((3 * len(rows), 3 * len(atoms)))
    pos0 = atoms.get_positions()
    for k, i in enumerate(rows):
        for a in range(3):
            forces = []
            for sign in (1.0, -1.0):
                pos = pos0.copy()
                pos[i, a] += sign * delta
                atoms.set_positions(pos)
                forces.append(atoms.get_forces().reshape(-1))
            out[3 * k + a] = -(forces[0] - forces[1]) / (2.0 * delta)
    return out


def _autograd(atoms: ase.Atoms, calc, rows: list[int]) -> np.ndarray:
    import torch
    from torch_geometric.data import Batch

    from potentials import keys
    from potentials.graph import AtomicGraph

    potential = calc.potential
    graph = AtomicGraph.from_atoms(atoms, potential.cutoff, dtype=calc.dtype)
    potential.check_elements(graph.z)
    batch = Batch.from_data_list([graph]).to(calc.device)
    pos = batch.pos.detach().requires_grad_(True)
    batch.pos = pos
    # the reference operations: compiled kernels need not support a second derivative
    kernels, potential.kernels = potential.kernels, "torch"
    try:
        forces = potential(batch, compute_forces=True, compute_stress=False, create_graph=True)[keys.FORCES]
    finally:
        potential.kernels = kernels
    flat = forces.reshape(-1)
    index = torch.tensor([3 * i + a for i in rows for a in range(3)], device=flat.device)
    out = torch.empty(len(index), flat.numel(), dtype=flat.dtype, device=flat.device)
    for k, j in enumerate(index.tolist()):
        (grad,) = torch.autograd.grad(flat[j], pos, retain_graph=k + 1 < len(index), allow_unused=True)
        out[k] = 0.0 if grad is None else -grad.reshape(-1)
    return out.detach().double().cpu().numpy()


def harmonic_frequencies(hess: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Harmonic frequencies (cm⁻¹, ascending) of a Hessian [3N, 3N] in eV/Å² with masses in amu.

    Eigenvalues of the mass-weighted Hessian M^-½ H M^-½; an imaginary mode (negative eigenvalue) is returned as a
    negative frequency, as ASE's vibrations report it with an ``i``. Translations and rotations give the values
    nearest zero.
    """
    from ase import units

    m = np.repeat(np.asarray(masses, dtype=float), 3)
    weighted = hess / np.sqrt(np.outer(m, m))
    eigenvalues = np.linalg.eigvalsh(0.5 * (weighted + weighted.T))
    # ħω in eV for ω² in eV/(Å² amu), the factor ASE's vibrations use
    hbar_omega = units._hbar * 1e10 / np.sqrt(units._e * units._amu) * np.sqrt(np.abs(eigenvalues))
    return np.sign(eigenvalues) * hbar_omega / units.invcm
