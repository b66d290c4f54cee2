"""Equation of state: E(V) over a range of volumes and a third-order Birch–Murnaghan fit.

At each volume the cell is scaled isotropically (crystals of cubic symmetry, which keep their shape) or its
shape is relaxed at fixed volume (FrechetCellFilter with ``constant_volume``); the positions are relaxed in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ase
import numpy as np
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS
from ase.units import GPa

from potentials.properties.symmetry import is_cubic
from potentials.relax import relax


def birch_murnaghan(v, e0: float, v0: float, b0: float, b0_prime: float):
    """Third-order Birch–Murnaghan energy (eV) at volume ``v`` (Å³); ``b0`` in eV/Å³."""
    eta = (v0 / np.asarray(v, float)) ** (2.0 / 3.0)
    return e0 + 9.0 * v0 * b0 / 16.0 * ((eta - 1.0) ** 3 * b0_prime + (eta - 1.0) ** 2 * (6.0 - 4.0 * eta))


def fit_birch_murnaghan(volumes, energies) -> dict[str, float]:
    """Least-squares Birch–Murnaghan fit: ``V0`` (Å³), ``E0`` (eV), ``B0_GPa``, ``B0_prime``, ``rms_eV``.

    Starts from the minimum of a parabola in V (at least four points needed).
    """
    from scipy.optimize import curve_fit

    v, e = np.asarray(volumes, float), np.asarray(energies, float)
    if len(v) < 4:
        raise ValueError("a Birch–Murnaghan fit needs at least four volumes")
    a, b, c = np.polyfit(v, e, 2)
    if a <= 0:
        raise ValueError("E(V) has no minimum inside the sampled volumes; widen the range or relax first")
    v0 = -b / (2 * a)
    guess = (c - b * b / (4 * a), v0, 2 * a * v0, 4.0)
    params, _ = curve_fit(birch_murnaghan, v, e, p0=guess, maxfev=20000)
    e0, v0, b0, b0p = (float(x) for x in params)
    rms = float(np.sqrt(np.mean((birch_murnaghan(v, *params) - e) ** 2)))
    return {"V0": v0, "E0": e0, "B0_GPa": b0 / GPa, "B0_prime": b0p, "rms_eV": rms}


@dataclass
class EOSResult:
    """E(V) samples (Å³, eV per cell) and their Birch–Murnaghan fit."""

    volumes: np.ndarray
    energies: np.ndarray
    fit: dict[str, float]
    mode: str
    atoms: ase.Atoms
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: ``V0`` (Å³ per cell), ``E0`` (eV), ``B0_GPa``, ``B0_prime`` and the samples."""
        n = len(self.atoms)
        return {**self.fit, "V0_per_atom": self.fit["V0"] / n, "n_atoms": n,
                "formula": self.atoms.get_chemical_formula(), "mode": self.mode,
                "volumes_A3": self.volumes.tolist(), "energies_eV": self.energies.tolist(), **self.info}


def equation_of_state(atoms: ase.Atoms, calc, *, volume_range: float = 0.05, points: int = 11,
                      relax_first: bool = True, mode: str = "auto", fmax: float = 1e-3,
                      steps: int = 500) -> EOSResult:
    """E(V) at ``points`` volumes V0·(1 + s), s evenly spaced in [−``volume_range``, +``volume_range``].

    Args:
        atoms: a periodic structure (not modified).
        calc: any ASE calculator (stress needed for ``relax_first`` and the shape relaxation).
        relax_first: relax positions and cell to zero stress first, so the volumes bracket the minimum.
        mode: ``"isotropic"`` (scale the cell), ``"relaxed"`` (relax its shape at fixed volume) or ``"auto"``
            (isotropic for cubic crystals, else relaxed).
        fmax: force threshold of the relaxations, eV/Å.
    """
    if not np.all(atoms.pbc):
        raise ValueError("an equation of state needs a structure periodic in all three directions")
    if mode not in ("auto", "isotropic", "relaxed"):
        raise ValueError(f"mode must be auto, isotropic or relaxed, got {mode!r}")
    info: dict[str, Any] = {"relaxed_first": relax_first}
    if relax_first:
        result = relax(atoms, calc, fmax=fmax * 0.1, steps=2 * steps, optimizer="BFGS", cell=True)
        atoms = result.atoms
        info["cell_relaxation_converged"] = result.converged
    atoms = atoms.copy()
    if mode == "auto":
        mode = "isotropic" if is_cubic(atoms) else "relaxed"
    volumes, energies = [], []
    for s in np.linspace(-volume_range, volume_range, points):
        sample = atoms.copy()
        sample.set_cell(atoms.cell.array * (1.0 + s) ** (1.0 / 3.0), scale_atoms=True)
        sample.calc = calc
        target = FrechetCellFilter(sample, constant_volume=True) if mode == "relaxed" else sample
        BFGS(target, logfile=None).run(fmax=fmax, steps=steps)
        volumes.append(sample.get_volume())
        energies.append(sample.get_potential_energy())
    fit = fit_birch_murnaghan(volumes, energies)
    return EOSResult(np.array(volumes), np.array(energies), fit, mode, atoms, info)


def plot_eos(volumes, energies, fit: dict[str, float], title: str = "", *, label: str = "model",
             reference: tuple[np.ndarray, np.ndarray, dict[str, float]] | None = None,
             reference_label: str = "reference"):
    """E(V) samples with their Birch–Murnaghan curve; ``reference`` (volumes, energies, fit) drawn beside."""
    from potentials.plots import BLUE, ORANGE, _figure, _note

    fig, ax = _figure()
    sets = [(volumes, energies, fit, label, BLUE)]
    if reference is not None:
        sets.append((*reference, reference_label, ORANGE))
    notes = []
    for v, e, f, name, color in sets:
        v = np.asarray(v, float)
        grid = np.linspace(v.min(), v.max(), 200)
        shift = f["E0"] if reference is not None else 0.0  # two sets: compare shapes, both from their minimum
        ax.plot(v, np.asarray(e) - shift, "o", color=color, ms=4, label=name)
        ax.plot(grid, birch_murnaghan(grid, f["E0"], f["V0"], f["B0_GPa"] * GPa, f["B0_prime"]) - shift,
                color=color, lw=1.0)
        notes.append(f"{name}: V0 {f['V0']:.3f} Å³, B0 {f['B0_GPa']:.1f} GPa, B0' {f['B0_prime']:.2f}")
    ax.set_xlabel("volume (Å³ per cell)")
    ax.set_ylabel("E − E0 (eV per cell)" if reference is not None else "energy (eV per cell)")
    _note(ax, "\n".join(notes))
    if reference is not None:
        ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    return fig
