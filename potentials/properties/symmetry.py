"""Crystal symmetry with spglib: the crystal system, and the standard conventional cell."""

from __future__ import annotations

import ase
import numpy as np


def _spglib_cell(atoms: ase.Atoms):
    return (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)


def is_cubic(atoms: ase.Atoms, symprec: float = 1e-3) -> bool:
    """Whether the crystal's space group is cubic (195–230): such cells keep their shape under pressure."""
    import spglib

    dataset = spglib.get_symmetry_dataset(_spglib_cell(atoms), symprec=symprec)
    return dataset is not None and 195 <= int(dataset.number) <= 230


def standard_cell(atoms: ase.Atoms, symprec: float = 1e-3) -> ase.Atoms:
    """The standard conventional cell of ``atoms`` in spglib's standard orientation (cubic: the cube's axes x, y, z).

    Tensors computed on it (elastic constants) are expressed in the crystal's conventional axes, whatever the
    orientation of the file read (a CIF, for instance, puts the first lattice vector along x).
    """
    import spglib

    found = spglib.standardize_cell(_spglib_cell(atoms), to_primitive=False, no_idealize=False, symprec=symprec)
    if found is None:
        raise ValueError(f"spglib found no symmetry for this structure at symprec={symprec}")
    lattice, scaled, numbers = found
    return ase.Atoms(numbers=numbers, cell=np.asarray(lattice), scaled_positions=scaled, pbc=True)
