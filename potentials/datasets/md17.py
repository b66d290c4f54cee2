"""MD17 and revised MD17 (rMD17) ``.npz`` files as ``ase.Atoms`` with labels in eV and eV/Å.

Two layouts are recognised by their keys:

* MD17 (sGDML): ``R`` (F, N, 3) Å, ``z`` (N,), ``E`` (F, 1) kcal/mol, ``F`` (F, N, 3) kcal/mol/Å; the
  metadata keys ``name``, ``theory``, ``type``, ``md5`` are optional.
* rMD17: ``nuclear_charges`` (N,), ``coords`` (F, N, 3) Å, ``energies`` (F,) kcal/mol, ``forces`` (F, N, 3)
  kcal/mol/Å; optional ``old_indices`` (F,), the frame's index in the original MD17 trajectory, plus
  ``old_energies`` and ``old_forces`` (not read).

Energies and forces are converted once, here, with 1 kcal/mol = ``units.kcal / units.mol`` eV.
Each frame carries ``atoms.info["source"]`` (file name), ``atoms.info["frame"]`` (index in the file),
``atoms.info["dataset"]`` (``"md17"`` or ``"rmd17"``) and, when present, ``atoms.info["old_indices"]`` (int)
and ``atoms.info["name"]`` (the molecule name from the MD17 metadata).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms, units

from potentials.datasets.validate import attach_labels, check_finite, check_shape, where

#: eV per kcal/mol (about 0.0433641).
KCAL_PER_MOL = units.kcal / units.mol

#: Key of each role in the two layouts: positions, atomic numbers, energies, forces.
LAYOUTS: dict[str, dict[str, str]] = {
    "md17": {"positions": "R", "numbers": "z", "energy": "E", "forces": "F"},
    "rmd17": {"positions": "coords", "numbers": "nuclear_charges", "energy": "energies", "forces": "forces"},
}


def read(path: str | os.PathLike, *, indices: Sequence[int] | np.ndarray | None = None) -> list[Atoms]:
    """Read an MD17 or rMD17 npz file.

    Args:
        path: the ``.npz`` file.
        indices: frame indices to read (0-based, into the file's frame axis), e.g. from
            :func:`read_split_indices`; None reads every frame.

    Returns:
        One ``ase.Atoms`` per selected frame, non-periodic, with a ``SinglePointCalculator`` holding
        ``energy`` (eV) and ``forces`` [N, 3] (eV/Å).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an npz, has neither layout, has inconsistent shapes, non-finite values,
            or an index is out of range. The message names the file, and the frame and field where relevant.
    """
    path = Path(path)
    source = path.name
    if not path.is_file():
        raise FileNotFoundError(f"MD17 file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{where(source)}: cannot be read as a numpy .npz archive ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{where(source)}: is a single .npy array, expected an .npz archive with named keys")
    with npz:
        found = sorted(npz.files)
        layout = _detect_layout(source, found)
        keys = LAYOUTS[layout]
        try:  # members are read (and CRC-checked) only now
            arrays = {role: np.asarray(npz[key]) for role, key in keys.items()}
            old_indices = np.asarray(npz["old_indices"]) if "old_indices" in found else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise ValueError(f"{where(source)}: an array in the archive is damaged ({type(exc).__name__}: {exc}); "
                             "the file is corrupted, download or copy it again") from exc
        name = _metadata_name(npz)

    numbers, positions, energy, forces = _checked_arrays(source, keys, arrays)
    n_frames = len(positions)
    if old_indices is not None:
        check_shape(old_indices, (n_frames,), source=source, field="old_indices")
    frames = _select(source, indices, n_frames)

    check_finite(positions[frames], source=source, field=keys["positions"], frame_ids=frames)
    check_finite(energy[frames], source=source, field=keys["energy"], frame_ids=frames)
    check_finite(forces[frames], source=source, field=keys["forces"], frame_ids=frames)

    images = []
    for i in frames:
        atoms = Atoms(numbers=numbers, positions=positions[i], pbc=False)
        energy_ev, forces_ev = energy[i] * KCAL_PER_MOL, forces[i] * KCAL_PER_MOL
        attach_labels(atoms, source=source, record=int(i), energy=energy_ev, forces=forces_ev)
        atoms.info.update(source=source, frame=int(i), dataset=layout)
        if old_indices is not None:
            atoms.info["old_indices"] = int(old_indices[i])
        if name is not None:
            atoms.info["name"] = name
        images.append(atoms)
    return images


def read_split_indices(csv_path: str | os.PathLike) -> np.ndarray:
    """Read an rMD17 split file (``index_train_01.csv`` etc.): one non-negative integer per line.

    Returns:
        [K] int64 frame indices, in file order. Blank lines are ignored.

    Raises:
        ValueError: a line is not a non-negative integer (the message names file and line).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"split file not found: {csv_path}")
    values = []
    for line_no, line in enumerate(csv_path.read_text().splitlines(), start=1):
        text = line.strip().rstrip(",")
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"file '{csv_path.name}', line {line_no}: {line!r} is not an integer frame index"
            ) from None
        if value < 0:
            raise ValueError(f"file '{csv_path.name}', line {line_no}: negative frame index {value}")
        values.append(value)
    return np.asarray(values, dtype=np.int64)


def _detect_layout(source: str, found: list[str]) -> str:
    for layout, keys in LAYOUTS.items():
        if set(keys.values()) <= set(found):
            return layout
    # Name what is missing for the layout the file comes closest to.
    closest = max(LAYOUTS, key=lambda name: len(set(LAYOUTS[name].values()) & set(found)))
    missing = sorted(set(LAYOUTS[closest].values()) - set(found))
    raise ValueError(
        f"{where(source)}: not an MD17 or rMD17 npz. Keys found: {found}. Expected either MD17 keys "
        f"{sorted(LAYOUTS['md17'].values())} or rMD17 keys {sorted(LAYOUTS['rmd17'].values())} "
        f"(closest: {closest}, missing {missing})."
    )


def _checked_arrays(
    source: str, keys: dict[str, str], arrays: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes against each other.

    Returns:
        numbers [N] int, positions [F, N, 3] Å, energy [F] and forces [F, N, 3] in the file's units.
    """
    numbers = arrays["numbers"]
    check_shape(numbers, (None,), source=source, field=keys["numbers"])
    if not np.issubdtype(numbers.dtype, np.number) or np.any(numbers != np.round(numbers)):
        raise ValueError(f"{where(source, field=keys['numbers'])}: atomic numbers must be integers")
    numbers = numbers.astype(np.int64)
    if np.any((numbers < 1) | (numbers > 118)):
        raise ValueError(f"{where(source, field=keys['numbers'])}: atomic numbers outside 1..118: {numbers}")
    n_atoms = len(numbers)

    positions = arrays["positions"].astype(float)
    check_shape(positions, (None, n_atoms, 3), source=source, field=keys["positions"])
    n_frames = len(positions)

    energy = arrays["energy"].astype(float)
    if energy.ndim == 2 and energy.shape[1] == 1:  # MD17 stores (F, 1)
        energy = energy[:, 0]
    check_shape(energy, (n_frames,), source=source, field=keys["energy"])

    forces = arrays["forces"].astype(float)
    check_shape(forces, (n_frames, n_atoms, 3), source=source, field=keys["forces"])
    return numbers, positions, energy, forces


def _select(source: str, indices: Sequence[int] | np.ndarray | None, n_frames: int) -> np.ndarray:
    if indices is None:
        return np.arange(n_frames)
    frames = np.asarray(indices)
    if frames.ndim != 1 or (frames.size and not np.issubdtype(frames.dtype, np.integer)):
        raise ValueError(f"{where(source)}: indices must be a 1-D sequence of integers, got {frames!r:.80}")
    bad = frames[(frames < 0) | (frames >= n_frames)]
    if bad.size:
        raise ValueError(
            f"{where(source)}: frame indices out of range 0..{n_frames - 1}: {bad[:5].tolist()}; "
            "is the split file meant for a different npz?"
        )
    return frames.astype(np.int64)


def _metadata_name(npz: np.lib.npyio.NpzFile) -> str | None:
    """The molecule name from MD17's optional ``name`` key, or None (also when it is a pickled object)."""
    if "name" not in npz.files:
        return None
    try:
        value = np.asarray(npz["name"])
    except ValueError:  # object array that would need pickle
        return None
    if not value.size:
        return None
    first = value.reshape(-1)[0]
    return first.decode() if isinstance(first, bytes) else str(first)
