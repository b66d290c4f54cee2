"""Elastic constants by stress–strain: symmetric ± finite strains of a cell relaxed to zero stress.

Voigt order xx, yy, zz, yz, xz, xy; shear strains are engineering strains (γ = 2ε), so that σ_i = Σ_j C_ij ε_j
with ε = (ε_xx, ε_yy, ε_zz, 2ε_yz, 2ε_xz, 2ε_xy). Stress has ASE's sign (tension positive); C is in GPa.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ase
import numpy as np
from ase.units import GPa

from potentials.relax import relax

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
VOIGT_NAMES = ("xx", "yy", "zz", "yz", "xz", "xy")


def strain_matrix(j: int, size: float) -> np.ndarray:
    """The symmetric 3×3 strain of Voigt component ``j`` with value ``size`` (engineering strain for shears)."""
    eps = np.zeros((3, 3))
    a, b = VOIGT[j]
    if a == b:
        eps[a, a] = size
    else:
        eps[a, b] = eps[b, a] = size / 2.0
    return eps


def strained(atoms: ase.Atoms, eps: np.ndarray) -> ase.Atoms:
    """A copy of ``atoms`` with cell and positions deformed by (1 + ``eps``)."""
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return out


def voigt_stress(atoms: ase.Atoms) -> np.ndarray:
    """Stress of ``atoms`` (its calculator), GPa, Voigt order xx, yy, zz, yz, xz, xy."""
    return np.asarray(atoms.get_stress(voigt=True)) / GPa


def moduli(c: np.ndarray) -> dict[str, dict[str, float]]:
    """Bulk and shear moduli (GPa) of the 6×6 ``c`` (GPa): Voigt (uniform strain), Reuss (uniform stress), Hill."""
    s = np.linalg.inv(c)
    k_v = (c[0, 0] + c[1, 1] + c[2, 2] + 2.0 * (c[0, 1] + c[1, 2] + c[0, 2])) / 9.0
    g_v = (c[0, 0] + c[1, 1] + c[2, 2] - (c[0, 1] + c[1, 2] + c[0, 2]) + 3.0 * (c[3, 3] + c[4, 4] + c[5, 5])) / 15.0
    k_r = 1.0 / (s[0, 0] + s[1, 1] + s[2, 2] + 2.0 * (s[0, 1] + s[1, 2] + s[0, 2]))
    g_r = 15.0 / (4.0 * (s[0, 0] + s[1, 1] + s[2, 2]) - 4.0 * (s[0, 1] + s[1, 2] + s[0, 2])
                  + 3.0 * (s[3, 3] + s[4, 4] + s[5, 5]))
    return {"bulk_modulus_GPa": {"voigt": float(k_v), "reuss": float(k_r), "hill": float((k_v + k_r) / 2.0)},
            "shear_modulus_GPa": {"voigt": float(g_v), "reuss": float(g_r), "hill": float((g_v + g_r) / 2.0)}}


@dataclass
class ElasticResult:
    """The stiffness tensor (GPa, Voigt order) and how it was obtained."""

    c: np.ndarray
    atoms: ase.Atoms
    strain: float
    relaxed_cell: bool
    relaxed_atoms: bool
    residual_stress: np.ndarray
    strains: np.ndarray = field(repr=False)
    stresses: np.ndarray = field(repr=False)
    relax_info: dict[str, Any] = field(default_factory=dict)

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of C (GPa); all positive is Born's stability criterion (any crystal system)."""
        return np.linalg.eigvalsh(self.c)

    @property
    def stable(self) -> bool:
        return bool(self.eigenvalues.min() > 0.0)

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: ``C_GPa``, moduli, stability, the (relaxed) lattice and the raw stress–strain data."""
        cell = self.atoms.cell
        return {
            "C_GPa": self.c.tolist(), "voigt_order": list(VOIGT_NAMES), **moduli(self.c),
            "born_stable": self.stable, "C_eigenvalues_GPa": self.eigenvalues.tolist(),
            "strain": self.strain, "relaxed_cell": self.relaxed_cell, "relaxed_atoms": self.relaxed_atoms,
            "lattice_A": cell.array.tolist(), "lattice_parameters": cell.cellpar().tolist(),
            "volume_A3": float(self.atoms.get_volume()), "n_atoms": len(self.atoms),
            "formula": self.atoms.get_chemical_formula(), "residual_stress_GPa": self.residual_stress.tolist(),
            "strains": self.strains.tolist(), "stresses_GPa": self.stresses.tolist(), **self.relax_info,
        }


def elastic_constants(atoms: ase.Atoms, calc, *, strain: float = 0.005, relax_cell: bool = True,
                      relax_atoms: bool = True, fmax: float = 1e-4, steps: int = 1000,
                      standardize: bool = False) -> ElasticResult:
    """The 6×6 elastic constants C_ij = ∂σ_i/∂ε_j (GPa) from central differences of the stress.

    Args:
        atoms: a periodic structure (not modified).
        calc: any ASE calculator that gives stress.
        strain: size of each ± strain (dimensionless; engineering strain for the shears).
        relax_cell: first relax positions and cell to zero stress (FrechetCellFilter, BFGS, to ``fmax``).
        relax_atoms: relax the positions at every strain (the relaxed-ion constants); off: clamped-ion.
        fmax: force threshold of the relaxations, eV/Å (the cell relaxation's stress threshold is fmax/volume).
        steps: maximum optimiser steps of each relaxation.
        standardize: replace ``atoms`` by its standard conventional cell first
            (:func:`~potentials.properties.symmetry.standard_cell`), so that C is in the crystal's conventional axes;
            otherwise C is in the Cartesian frame of ``atoms`` as given.
    """
    if not np.all(atoms.pbc):
        raise ValueError("elastic constants need a structure periodic in all three directions")
    info: dict[str, Any] = {"standardized": standardize}
    if standardize:
        from potentials.properties.symmetry import standard_cell

        atoms = standard_cell(atoms)
    if relax_cell:
        result = relax(atoms, calc, fmax=fmax, steps=steps, optimizer="BFGS", cell=True)
        atoms = result.atoms
        info.update(cell_relaxation_converged=result.converged, cell_relaxation_steps=result.steps)
    else:
        atoms = atoms.copy()
    atoms.calc = calc
    residual = voigt_stress(atoms)
    c = np.empty((6, 6))
    strains, stresses = [], []
    for j in range(6):
        pair = []
        for sign in (1.0, -1.0):
            deformed = strained(atoms, strain_matrix(j, sign * strain))
            if relax_atoms:
                deformed = relax(deformed, calc, fmax=fmax, steps=steps, optimizer="BFGS").atoms
            deformed.calc = calc
            sigma = voigt_stress(deformed)
            pair.append(sigma)
            strains.append(np.eye(6)[j] * sign * strain)
            stresses.append(sigma)
        c[:, j] = (pair[0] - pair[1]) / (2.0 * strain)
    return ElasticResult(0.5 * (c + c.T), atoms, strain, relax_cell, relax_atoms, residual, np.array(strains),
                         np.array(stresses), info)


def plot_elastic(result: ElasticResult, title: str = ""):
    """The 6×6 C_ij as an annotated map (GPa)."""
    from potentials.plots import _figure

    fig, ax = _figure(5.2, 4.4)
    c = result.c
    vmax = float(np.abs(c).max()) or 1.0
    im = ax.imshow(c, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    for i in range(6):
        for j in range(6):
            ax.text(j, i, f"{c[i, j]:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(c[i, j]) > 0.6 * vmax else "black")
    ax.set_xticks(range(6), VOIGT_NAMES)
    ax.set_yticks(range(6), VOIGT_NAMES)
    fig.colorbar(im, ax=ax, label="C_ij (GPa)", shrink=0.8)
    m = moduli(c)
    ax.set_title(title or f"K_Hill {m['bulk_modulus_GPa']['hill']:.1f} GPa, G_Hill "
                 f"{m['shear_modulus_GPa']['hill']:.1f} GPa", fontsize=10)
    return fig
