"""Reading and writing structures for the command-line tools (relax, md): files, multi-frame files, folders.

Everything is read through ASE first and through pymatgen for the formats only pymatgen reads; every frame
of a multi-frame file is a structure of its own. Folders are expanded to the files directly inside them
(hidden files are ignored); files in a folder that neither library reads are skipped and reported, while
an explicitly named file that cannot be read is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.io

#: ``--format`` choice → (ASE format name, file suffix) of written structures.
WRITE_FORMATS: dict[str, tuple[str, str]] = {
    "extxyz": ("extxyz", ".extxyz"),
    "xyz": ("extxyz", ".xyz"),
    "cif": ("cif", ".cif"),
    "vasp": ("vasp", ".vasp"),
    "poscar": ("vasp", ".vasp"),
    "traj": ("traj", ".traj"),
}


@dataclass
class StructureSet:
    """Structures gathered from files and folders.

    Attributes:
        names: one unique name per structure: the file stem (``<folder>_poscar`` for a file named POSCAR, and
            likewise for other names ASE recognises a format by), plus ``_<frame>`` for multi-frame files (and a
            ``-2``, ``-3`` … suffix when two files share a stem).
        structures: the ``ase.Atoms``, in the order the paths were given (folders sorted by file name).
        skipped: files inside folders that could not be read, with the reason.
    """

    names: list[str] = field(default_factory=list)
    structures: list[ase.Atoms] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.structures)


def read_structures(path: str | os.PathLike, index: str | int = ":") -> list[ase.Atoms]:
    """Frames of one file through ASE, falling back to pymatgen for formats only it reads.

    Args:
        path: the file (CIF, POSCAR/CONTCAR, extxyz, traj, vasprun.xml, ...).
        index: which frames, as in ``ase.io.read`` (``":"`` all, ``-1`` the last).

    Raises:
        ValueError: neither ASE nor pymatgen reads the file (both messages are included), or it holds no structure.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no structure file at {path}")
    try:
        frames = ase.io.read(path, index)
        frames = frames if isinstance(frames, list) else [frames]
        ase_err = "no structure found" if not frames else None
    except Exception as err:  # noqa: BLE001 - try pymatgen before giving up
        frames, ase_err = [], err
    if ase_err is not None:
        try:
            from pymatgen.core import Structure
            from pymatgen.io.ase import AseAtomsAdaptor

            frames = [AseAtomsAdaptor.get_atoms(Structure.from_file(path))]
        except Exception as pmg_err:  # noqa: BLE001
            raise ValueError(f"cannot read {path}: ASE said: {ase_err}; pymatgen said: {pmg_err}") from None
    return frames


def collect_structures(paths: list[str | os.PathLike]) -> StructureSet:
    """All structures in ``paths``: files (every frame) and folders (every readable file directly inside).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: an explicitly named file cannot be read.
    """
    result = StructureSet()
    used: set[str] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            in_folder = True
        elif path.is_file():
            files, in_folder = [path], False
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        for file in files:
            try:
                frames = read_structures(file)
            except ValueError as err:
                if not in_folder:
                    raise
                result.skipped.append((file, str(err)))
                continue
            stem = _name_of(file)
            for k, atoms in enumerate(frames):
                name = _unique(stem + (f"_{k}" if len(frames) > 1 else ""), used)
                result.names.append(name)
                result.structures.append(atoms)
    return result


def _name_of(file: Path) -> str:
    """The file stem; names ASE recognises a format by (POSCAR, CONTCAR, OUTCAR, ...) become
    ``<folder>_<name in lower case>`` so that files written under them are not mistaken for that format."""
    from fnmatch import fnmatchcase

    from ase.io.formats import ioformats

    stem = file.stem
    if any(fnmatchcase(stem, glob) for fmt in ioformats.values() for glob in fmt.globs):
        folder = file.resolve().parent.name
        return f"{folder}_{stem.lower()}" if folder else stem.lower()
    return stem


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


def write_structure(atoms: ase.Atoms, folder: str | os.PathLike, stem: str, fmt: str = "extxyz") -> Path:
    """Write ``atoms`` to ``<folder>/<stem><suffix>`` in ``fmt`` (see :data:`WRITE_FORMATS`).

    extxyz and traj files keep the energy (eV), forces (eV/Å) and stress (eV/Å³) the attached calculator last
    computed; CIF and POSCAR hold the structure only.

    Returns:
        The path written.
    """
    if fmt not in WRITE_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    ase_format, suffix = WRITE_FORMATS[fmt]
    results = dict(getattr(atoms.calc, "results", None) or {})
    atoms = atoms.copy()
    if ase_format in ("extxyz", "traj") and results:
        from ase.calculators.singlepoint import SinglePointCalculator

        kept = {k: results[k] for k in ("energy", "free_energy", "forces", "stress") if k in results}
        atoms.calc = SinglePointCalculator(atoms, **kept)
    target = Path(folder) / f"{stem}{suffix}"
    if ase_format == "vasp":
        ase.io.write(target, atoms, format="vasp", direct=True, sort=False)
    else:
        ase.io.write(target, atoms, format=ase_format)
    return target
