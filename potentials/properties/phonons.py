"""Harmonic phonons with phonopy: force constants from the autograd Hessian or from finite displacements.

The band path is the standard one of the primitive cell's Bravais lattice (Setyawan & Curtarolo, Comput. Mater.
Sci. 49, 299 (2010)) as ASE tabulates it (``ase.cell.Cell.bandpath``). Frequencies are in THz; imaginary ones are
reported as negative numbers (phonopy's convention). Thermal properties are per mole of primitive cells.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import ase
import numpy as np

#: Frequencies below −this (THz) count as imaginary; round-off leaves the acoustic modes at Γ a little off zero.
IMAGINARY_TOLERANCE_THZ = 0.05
#: Rough cost of one Hessian row (a second backward pass) in force evaluations, for ``method="auto"``.
HESSIAN_ROW_COST = 2.0


@dataclass
class PhononResult:
    """Force constants and what phonopy derives from them (frequencies THz, energies kJ/mol, J/K/mol).

    ``n_evaluations``: displaced supercells, or Hessian rows (see :func:`force_constants`).
    """

    phonopy: Any
    method: str
    n_evaluations: int
    labels: list[str]
    label_positions: list[float]
    distances: list[np.ndarray]
    frequencies: list[np.ndarray]
    special_points: list[dict]
    dos: dict[str, np.ndarray]
    thermal: dict[str, np.ndarray]
    path_connections: list[bool] = field(default_factory=list)

    @property
    def imaginary_modes(self) -> int:
        """Number of (q-point, branch) pairs on the band path below −:data:`IMAGINARY_TOLERANCE_THZ`."""
        return int(sum((f < -IMAGINARY_TOLERANCE_THZ).sum() for f in self.frequencies))

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: settings, frequencies on the path and at its special points, DOS, thermal data."""
        ph = self.phonopy
        return {
            "method": self.method, "evaluations": self.n_evaluations,
            "supercell_matrix": np.asarray(ph.supercell_matrix).tolist(),
            "primitive_cell_A": np.asarray(ph.primitive.cell).tolist(),
            "primitive_symbols": list(ph.primitive.symbols), "atoms_in_supercell": len(ph.supercell),
            "imaginary_modes": self.imaginary_modes, "imaginary_tolerance_THz": IMAGINARY_TOLERANCE_THZ,
            "min_frequency_THz": float(min(f.min() for f in self.frequencies)),
            "max_frequency_THz": float(max(f.max() for f in self.frequencies)),
            "special_points": self.special_points,
            "band": {"labels": self.labels, "label_positions": self.label_positions,
                     "distances": [d.tolist() for d in self.distances],
                     "frequencies_THz": [f.tolist() for f in self.frequencies]},
            "dos": {"frequency_THz": self.dos["frequency_points"].tolist(),
                    "states_per_THz": self.dos["total_dos"].tolist()},
            "thermal": {"temperature_K": self.thermal["temperatures"].tolist(),
                        "free_energy_kJ_per_mol": self.thermal["free_energy"].tolist(),
                        "entropy_J_per_K_per_mol": self.thermal["entropy"].tolist(),
                        "heat_capacity_J_per_K_per_mol": self.thermal["heat_capacity"].tolist()},
        }


def to_phonopy_atoms(atoms: ase.Atoms):
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell.array,
                        scaled_positions=atoms.get_scaled_positions(wrap=False))


def to_ase(cell) -> ase.Atoms:
    return ase.Atoms(symbols=list(cell.symbols), cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)


def force_constants(ph, calc, *, method: str = "auto", displacement: float = 0.01) -> tuple[str, int]:
    """Set ``ph.force_constants`` (eV/Å²) from ``calc``; returns the method used and its count of evaluations.

    The count is of displaced supercells (displacements), of Hessian rows (autograd: one force evaluation kept
    for a second derivative, then one backward pass per row) or of force evaluations (central differences).

    ``"hessian"``: rows of the supercell Hessian for the primitive cell's atoms (phonopy's compact form; autograd
    for a :class:`~potentials.calculator.PotentialCalculator`, central differences otherwise). ``"displacements"``:
    phonopy's symmetry-reduced ± displacements of ``displacement`` Å. ``"auto"``: the Hessian for a
    PotentialCalculator when its rows cost fewer force evaluations than the displacements, else displacements.
    """
    from potentials.calculator import PotentialCalculator
    from potentials.properties.hessian import hessian

    if method not in ("auto", "hessian", "displacements"):
        raise ValueError(f"method must be auto, hessian or displacements, got {method!r}")
    ph.generate_displacements(distance=displacement, is_plusminus=True)
    supercells = ph.supercells_with_displacements
    rows = [int(i) for i in ph.primitive.p2s_map]
    if method == "auto":
        cheaper = 3 * len(rows) * HESSIAN_ROW_COST <= len(supercells)
        method = "hessian" if isinstance(calc, PotentialCalculator) and cheaper else "displacements"
    if method == "hessian":
        supercell = to_ase(ph.supercell)
        h = hessian(supercell, calc, rows=rows, delta=displacement)
        n = len(supercell)
        ph.force_constants = h.reshape(len(rows), 3, n, 3).transpose(0, 2, 1, 3)
        autograd = isinstance(calc, PotentialCalculator)
        return method, 3 * len(rows) if autograd else 6 * len(rows)
    forces = []
    for cell in supercells:
        atoms = to_ase(cell)
        atoms.calc = calc
        forces.append(atoms.get_forces())
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    ph.symmetrize_force_constants()
    return method, len(supercells)


def band_path(primitive_cell: np.ndarray, npoints: int = 51) -> tuple[list[np.ndarray], list[bool], list[str],
                                                                        dict[str, np.ndarray]]:
    """The standard path of ``primitive_cell``: q-point segments (reduced coordinates), connections, labels."""
    from ase.cell import Cell
    from ase.dft.kpoints import parse_path_string

    path = Cell(primitive_cell).bandpath(npoints=0)
    special = {k: np.asarray(v, float) for k, v in path.special_points.items()}
    segments, connections, labels = [], [], []
    for branch in parse_path_string(path.path):
        for start, end in zip(branch[:-1], branch[1:], strict=True):
            segments.append(np.linspace(special[start], special[end], npoints))
            connections.append(True)
        connections[-1] = False
        labels.extend(branch)
    return segments, connections, labels, special


def phonons(atoms: ase.Atoms, calc, supercell=(3, 3, 3), *, method: str = "auto", displacement: float = 0.01,
            mesh: float | tuple[int, int, int] = 30.0, t_min: float = 0.0, t_max: float = 1000.0,
            t_step: float = 10.0, npoints: int = 51, primitive_matrix="auto", symprec: float = 1e-5) -> PhononResult:
    """Phonon band structure along the standard path, DOS and harmonic thermal properties of ``atoms``.

    Args:
        atoms: a (relaxed) periodic unit cell; phonopy finds its primitive cell (``primitive_matrix="auto"``).
        calc: any ASE calculator; a :class:`~potentials.calculator.PotentialCalculator` can give exact force
            constants by autograd.
        supercell: three repetitions of ``atoms`` (or a 3×3 matrix) for the force constants.
        method: ``"auto"``, ``"hessian"`` or ``"displacements"`` (see :func:`force_constants`).
        displacement: finite displacement, Å (displacements, and the Hessian of calculators without autograd).
        mesh: q-point mesh for the DOS and thermal properties: three numbers, or a length (phonopy's meaning).
        t_min, t_max, t_step: temperatures of the thermal properties, K.
        npoints: q-points per band-path segment.
    """
    from phonopy import Phonopy

    if not np.all(atoms.pbc):
        raise ValueError("phonons need a structure periodic in all three directions")
    matrix = np.asarray(supercell, dtype=int)
    matrix = np.diag(matrix) if matrix.shape == (3,) else matrix
    with warnings.catch_warnings():
        # the notice that phonopy's default changed to "auto": chosen here on purpose, and documented
        warnings.filterwarnings("ignore", message="primitive_matrix defaulted")
        ph = Phonopy(to_phonopy_atoms(atoms), supercell_matrix=matrix, primitive_matrix=primitive_matrix,
                     symprec=symprec)
    used, evaluations = force_constants(ph, calc, method=method, displacement=displacement)

    segments, connections, labels, special = band_path(np.asarray(ph.primitive.cell), npoints)
    ph.run_band_structure(segments, path_connections=connections)
    distances = [np.asarray(d) for d in ph.band_structure.distances]
    frequencies = [np.asarray(f) for f in ph.band_structure.frequencies]
    # label positions: the start of each branch, then the end of every segment
    positions = []
    for k, d in enumerate(distances):
        if k == 0 or not connections[k - 1]:
            positions.append(float(d[0]))
        positions.append(float(d[-1]))
    points = []
    for name, q in special.items():
        if name in labels:
            ph.run_qpoints([q])
            points.append({"label": name, "q": q.tolist(),
                           "frequencies_THz": np.asarray(ph.qpoints.frequencies)[0].tolist()})
    ph.run_mesh(mesh, is_gamma_center=True)
    ph.run_total_dos()
    dos = {"frequency_points": np.asarray(ph.total_dos.frequency_points), "total_dos": np.asarray(ph.total_dos.dos)}
    # the three zero-frequency acoustic modes at Γ carry no heat; left in, round-off makes them add ln(ω) terms
    ph.run_thermal_properties(t_min=t_min, t_max=t_max, t_step=t_step, exclude_gamma_acoustic=True)
    tp = ph.thermal_properties
    thermal = {k: np.asarray(getattr(tp, k)) for k in ("temperatures", "free_energy", "entropy", "heat_capacity")}
    return PhononResult(ph, used, evaluations, labels, positions, distances, frequencies, points, dos, thermal,
                        connections)


def plot_bands(result: PhononResult, title: str = ""):
    """Band structure along the path beside the total DOS (THz)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from potentials.plots import BLUE, GREY

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_dos = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [4, 1]})
    for d, f in zip(result.distances, result.frequencies, strict=True):
        ax.plot(d, f, color=BLUE, lw=1.0)
    ax.axhline(0.0, color=GREY, lw=0.6)
    ticks, names = [], []
    for x, name in zip(result.label_positions, result.labels, strict=True):
        if ticks and abs(x - ticks[-1]) < 1e-9:  # a branch break: two labels at one position
            names[-1] = f"{names[-1]}|{name}"
            continue
        ticks.append(x)
        names.append(name)
    for x in ticks:
        ax.axvline(x, color="0.8", lw=0.6)
    ax.set_xticks(ticks, ["Γ" if n == "G" else n.replace("G|", "Γ|").replace("|G", "|Γ") for n in names])
    ax.set_xlim(ticks[0], ticks[-1])
    ax.set_ylabel("frequency (THz)")
    if title:
        ax.set_title(title)
    ax_dos.plot(result.dos["total_dos"], result.dos["frequency_points"], color=BLUE, lw=1.0)
    ax_dos.set_xlabel("DOS (1/THz)")
    ax_dos.set_xlim(left=0)
    return fig


def plot_thermal(result: PhononResult, title: str = ""):
    """Helmholtz free energy, entropy and heat capacity against temperature (per mole of primitive cells)."""
    from potentials.plots import BLUE, GREY, ORANGE, _figure

    fig, axes = _figure(5.0, 6.0, rows=3, sharex=True)
    t = result.thermal["temperatures"]
    axes[0].plot(t, result.thermal["free_energy"], color=BLUE)
    axes[0].set_ylabel("F (kJ/mol)")
    axes[1].plot(t, result.thermal["entropy"], color=ORANGE)
    axes[1].set_ylabel("S (J/K/mol)")
    axes[2].plot(t, result.thermal["heat_capacity"], color=GREY)
    axes[2].set_ylabel("C_v (J/K/mol)")
    axes[2].set_xlabel("temperature (K)")
    if title:
        axes[0].set_title(title)
    return fig
