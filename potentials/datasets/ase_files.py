"""Any file ``ase.io.read`` understands (extxyz, ASE trajectory, ASE database, ...) as labelled ``ase.Atoms``.

Labels come from the file's calculator results (``energy``, ``forces``, ``stress``) or, when a key is given,
from ``atoms.info`` / ``atoms.arrays`` (e.g. ``energy_key="REF_energy"``, ``forces_key="REF_forces"``).
They are converted once, here, to eV, eV/Å and eV/Å³: ``energy_unit`` names the energy unit of the file
and applies to forces (energy/Å) and stress (energy/Å³) as well. Stress must already follow ASE's sign
(σ = (1/V)·∂E/∂ε, positive when the cell wants to shrink); 6 Voigt values, 9 values or 3×3 are accepted.

Each frame carries ``atoms.info["source"]`` (file name) and ``atoms.info["frame"]`` (index in the file).
Constraints (e.g. ``FixAtoms``), tags, pbc and cell are kept as ASE reads them. A frame without a label
simply has no such result on its calculator; nothing is filled with zeros.
"""

from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import read as ase_read
from ase.io.formats import string2index

from potentials.datasets.validate import attach_labels, max_plausible_energy, where

#: eV per unit of the supported energy units.
ENERGY_UNITS: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "kcal/mol": units.kcal / units.mol,
    "kJ/mol": units.kJ / units.mol,
    "Hartree": units.Hartree,
}


def read(
    path: str | os.PathLike,
    *,
    index: str | int | slice = ":",
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    energy_unit: str = "eV",
    format: str | None = None,
) -> list[Atoms]:
    """Read structures and labels from a file in any format ASE reads.

    Args:
        path: the file (``.extxyz``/``.xyz``, ``.traj``, ``.db``, ...).
        index: which frames, as in ``ase.io.read``: ``":"`` (all), an int, a slice or a slice string.
            The whole file is parsed (so frame positions are known); ``index`` only selects.
        energy_key: ``atoms.info`` key of the total energy; None uses the calculator's ``energy``.
        forces_key: ``atoms.arrays`` key of the [N, 3] forces; None uses the calculator's ``forces``.
        stress_key: ``atoms.info`` key of the stress (6, 9 or 3×3 values, ASE sign); None uses the
            calculator's ``stress``.
        energy_unit: unit of energies in the file, one of :data:`ENERGY_UNITS`; forces and stress are taken
            to be in that unit per Å and per Å³.
        format: ASE format name when the file extension does not tell it.

    Returns:
        One ``ase.Atoms`` per frame with a ``SinglePointCalculator`` holding whichever of ``energy`` (eV),
        ``forces`` [N, 3] (eV/Å) and ``stress`` (6 Voigt values, eV/Å³) the frame has.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be parsed, a label is not finite or has the wrong shape, a given key is
            found in no frame, or ``energy_unit`` is unknown. Messages name the file, frame and field.

    Warns:
        UserWarning: energies larger in magnitude than any all-electron total energy of those atoms could
            be in eV (for example kcal/mol values read as eV).
    """
    path = Path(path)
    source = path.name
    if energy_unit not in ENERGY_UNITS:
        raise ValueError(
            f"{where(source)}: unknown energy_unit {energy_unit!r}; use one of {list(ENERGY_UNITS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"structure file not found: {path}")
    try:
        images = ase_read(path, index=":", format=format)
    except Exception as exc:  # ASE raises many different types for malformed files
        raise ValueError(
            f"{where(source)}: ASE cannot read this file ({type(exc).__name__}: {exc}); check the format "
            "(pass format=... if the extension is unusual) and that the file is complete"
        ) from exc
    if isinstance(images, Atoms):
        images = [images]
    frame_ids = _frame_ids(source, index, len(images))

    factor = ENERGY_UNITS[energy_unit]
    keys = {"energy": energy_key, "forces": forces_key, "stress": stress_key}
    seen = dict.fromkeys(keys, False)
    implausible = []
    result = []
    for frame in frame_ids:
        atoms = images[frame]
        labels = {field: _take(atoms, field, key) for field, key in keys.items()}
        for field, value in labels.items():
            seen[field] |= value is not None
        scaled = {field: None if value is None else np.asarray(value, dtype=float) * factor
                  for field, value in labels.items()}
        attach_labels(atoms, source=source, record=frame, **scaled)
        atoms.info.update(source=source, frame=frame)
        if scaled["energy"] is not None and abs(scaled["energy"]) > max_plausible_energy(atoms.numbers):
            implausible.append(frame)
        result.append(atoms)

    for field, key in keys.items():
        if key is not None and not seen[field] and result:
            where_ = "atoms.arrays" if field == "forces" else "atoms.info"
            raise ValueError(
                f"{where(source, field=field)}: key {key!r} is in none of the {len(result)} frames read "
                f"(looked in {where_} and the calculator results); keys of frame {frame_ids[0]}: "
                f"info {sorted(images[frame_ids[0]].info)}, arrays {sorted(images[frame_ids[0]].arrays)}"
            )
    if implausible:
        warnings.warn(
            f"{where(source)}: {len(implausible)} of {len(result)} energies (first: frame "
            f"{implausible[0]}) are larger in magnitude than any all-electron energy of those atoms in eV; "
            f"with energy_unit={energy_unit!r} they are probably in another unit (kcal/mol?). "
            "Pass energy_unit=... to convert.",
            UserWarning,
            stacklevel=2,
        )
    return result


def _take(atoms: Atoms, field: str, key: str | None) -> np.ndarray | float | None:
    """One label of one frame: from info/arrays under ``key``, else from the calculator results.

    The raw value is popped from ``info``/``arrays`` so that no copy in the file's unit stays on the frame.
    """
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    if key is None:
        return results.get(field)
    if key in atoms.info:
        return atoms.info.pop(key)
    if key in atoms.arrays:
        return atoms.arrays.pop(key)
    return results.get(key)  # extxyz moves a few names (energy, forces, stress, ...) into the calculator


def _frame_ids(source: str, index: str | int | slice, n_frames: int) -> list[int]:
    """Positions in the file of the frames ``index`` selects (an int, a slice or a slice string)."""
    selector = string2index(index) if isinstance(index, str) else index
    ids = list(range(n_frames))
    if isinstance(selector, slice):
        return ids[selector]
    try:
        selector = operator.index(selector)
    except TypeError:
        raise ValueError(
            f"{where(source)}: index {index!r} is not an int, a slice or a slice string like '10:20'"
        ) from None
    if not -n_frames <= selector < n_frames:
        raise ValueError(f"{where(source)}: frame {selector} out of range, the file holds {n_frames} frames")
    return [ids[selector]]
