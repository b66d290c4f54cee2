"""Label checks shared by the dataset adapters, and the one place labels are attached to ``ase.Atoms``.

Every error names the file, the record (frame) and the field, so a broken input can be found and fixed.
Labels end up on a :class:`~ase.calculators.singlepoint.SinglePointCalculator` in eV, eV/Å and eV/Å³
(ASE's stress sign, σ = (1/V)·∂E/∂ε, stored as the 6-component Voigt vector xx, yy, zz, yz, xz, xy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

#: Thomas–Fermi total energy of a neutral atom is −0.7687·Z^(7/3) Hartree; it bounds the all-electron
#: energy magnitude from above (the real energy is higher), so a total energy far beyond it cannot be in eV.
_THOMAS_FERMI_HARTREE = 0.7687
#: Headroom over the bound, for relativistic all-electron energies of heavy elements.
_BOUND_SAFETY = 1.5


def where(source: str, record: int | str | None = None, field: str | None = None) -> str:
    """Format a location for an error message, e.g. ``file 'a.npz', frame 3, field 'energies'``."""
    text = f"file '{source}'"
    if record is not None:
        text += f", frame {record}"
    if field is not None:
        text += f", field '{field}'"
    return text


def check_shape(
    array: np.ndarray, expected: Sequence[int | None], *, source: str, field: str, record: int | None = None
) -> None:
    """Raise ``ValueError`` unless ``array.shape`` matches ``expected`` (``None`` matches any length)."""
    shape = np.shape(array)
    ok = len(shape) == len(expected)
    ok = ok and all(e is None or e == s for e, s in zip(expected, shape, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{where(source, record, field)}: shape {shape}, expected {want}")


def check_finite(
    values: np.ndarray, *, source: str, field: str, frame_ids: Sequence[int] | None = None
) -> None:
    """Raise ``ValueError`` naming the first frame whose values contain NaN or inf.

    Args:
        values: array whose leading axis runs over frames, any trailing shape.
        source: file name used in the message.
        field: label name used in the message.
        frame_ids: index in the file of each row of ``values`` (default: the row number).
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return
    rows = values.reshape(len(values), -1)
    bad_rows = ~np.isfinite(rows).all(axis=1)
    if bad_rows.any():
        row = int(np.argmax(bad_rows))
        frame = row if frame_ids is None else int(frame_ids[row])
        bad = rows[row][~np.isfinite(rows[row])][0]
        raise ValueError(
            f"{where(source, frame, field)}: value is not finite ({bad}); remove or repair that frame"
        )


def as_voigt_stress(stress: np.ndarray, *, source: str, record: int, field: str = "stress") -> np.ndarray:
    """Return stress as the 6-component Voigt vector (xx, yy, zz, yz, xz, xy); accepts 6, 9 or 3×3 values."""
    stress = np.asarray(stress, dtype=float)
    if stress.shape == (6,):
        return stress
    if stress.shape in ((9,), (3, 3)):
        return full_3x3_to_voigt_6_stress(stress.reshape(3, 3))
    raise ValueError(
        f"{where(source, record, field)}: stress has shape {stress.shape}, expected 6 Voigt values or 3x3"
    )


def attach_labels(
    atoms: Atoms,
    *,
    source: str,
    record: int,
    energy: float | None = None,
    forces: np.ndarray | None = None,
    stress: np.ndarray | None = None,
) -> Atoms:
    """Check labels (already in eV units) and put them on a fresh ``SinglePointCalculator``.

    Args:
        atoms: the structure; its previous calculator, if any, is replaced.
        source: file name, for error messages.
        record: frame index in the file, for error messages.
        energy: total energy, eV, or None when the frame has no energy label.
        forces: [N, 3] eV/Å, or None.
        stress: 6 Voigt values or 3×3, eV/Å³ with ASE's sign, or None.

    Returns:
        The same ``atoms`` object. Absent labels are left absent (never replaced by zeros).
    """
    results: dict[str, float | np.ndarray] = {}
    if energy is not None:
        value = np.asarray(energy, dtype=float)
        if value.size != 1:
            raise ValueError(f"{where(source, record, 'energy')}: expected one number, got {value.shape}")
        results["energy"] = float(value.reshape(()))
    if forces is not None:
        forces = np.array(forces, dtype=float)
        check_shape(forces, (len(atoms), 3), source=source, field="forces", record=record)
        results["forces"] = forces
    if stress is not None:
        results["stress"] = as_voigt_stress(stress, source=source, record=record)
    for field, value in results.items():
        check_finite(np.reshape(value, (1, -1)), source=source, field=field, frame_ids=[record])
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def max_plausible_energy(numbers: Sequence[int] | np.ndarray) -> float:
    """Upper bound (eV) on the magnitude of any total energy of a structure with these atomic numbers.

    The bound is the Thomas–Fermi all-electron energy of the isolated atoms with 50% headroom; chemical
    binding is a tiny fraction of it. Pseudopotential energies are far smaller still.
    """
    z = np.asarray(numbers, dtype=float)
    return float(_BOUND_SAFETY * _THOMAS_FERMI_HARTREE * units.Hartree * np.sum(z ** (7.0 / 3.0)))
