"""The embedded default dataset: fcc metals and their alloys labelled with ASE's EMT calculator.

The set needs no download: :func:`read` generates it deterministically from a seed, writes it once to an
extxyz cache ``<root>/emt/emt_<hash of options>.extxyz`` and reads the cache afterwards. Three kinds of
periodic configurations (``atoms.info["config_type"]``) are mixed:

* ``"bulk"`` – primitive or cubic fcc cells and supercells of 1–32 atoms, strained (symmetric strain,
  components up to ``max_strain``) and rattled (Gaussian displacements whose root-mean-square length per
  atom is drawn from ``rattle``);
* ``"vacancy"`` – 15–31 atoms: a 16–32 atom supercell with one atom removed, strained and rattled;
* ``"slab"`` – (111), (100) and (110) slabs of 12–27 atoms with vacuum along z, pbc (T, T, F), strained
  in plane and rattled.

Each structure is a pure element or a random substitutional alloy of ``elements``; the lattice constant is
the composition average (Vegard's law) of ``ase.build.bulk``'s fcc lattice constants. Labels: energy (eV)
and forces (eV/Å) always, stress (eV/Å³, ASE sign) only for fully periodic cells. With the defaults
(400 structures of Cu, Ag, Au) the force components have a root-mean-square of about 0.5 eV/Å and
generation takes a few seconds on one core.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc110, fcc111
from ase.calculators.emt import EMT
from ase.data import atomic_numbers, reference_states
from ase.io import write

from potentials.datasets import ase_files
from potentials.datasets.validate import attach_labels

#: fcc metals ASE's EMT has parameters for.
SUPPORTED_ELEMENTS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
#: Default elements: a small model learns Cu, Ag, Au and their alloys in a few minutes on a CPU.
DEFAULT_ELEMENTS = ("Cu", "Ag", "Au")
#: Bump when the generator changes, so caches written by an older generator are not reused.
GENERATOR_VERSION = 1
#: Kinds in the order structures cycle through them (50% bulk, 20% vacancy, 30% slab).
KIND_CYCLE = ("bulk", "slab", "bulk", "vacancy", "bulk", "slab", "bulk", "bulk", "vacancy", "slab")
#: Bulk cells: (cubic cell?, repeats) with their weights; 1–32 atoms, mostly 8–32.
BULK_CELLS = (
    ((False, (1, 1, 1)), 0.05),  # 1 atom
    ((True, (1, 1, 1)), 0.10),  # 4
    ((False, (2, 2, 2)), 0.15),  # 8
    ((True, (2, 1, 1)), 0.15),  # 8
    ((True, (2, 2, 1)), 0.20),  # 16
    ((False, (3, 3, 3)), 0.15),  # 27
    ((True, (2, 2, 2)), 0.20),  # 32
)
VACANCY_CELLS = ((True, (2, 2, 1)), (False, (3, 3, 3)), (True, (2, 2, 2)))
SLAB_BUILDERS = (fcc111, fcc100, fcc110)
SLAB_SIZES = ((2, 2, 3), (2, 2, 4), (3, 3, 3))
#: Vacuum on each side of a slab, Å.
SLAB_VACUUM = 6.0
#: Probability that a structure is a single element (otherwise a random alloy).
PURE_FRACTION = 0.4


def read(
    path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    n_structures: int = 400,
    elements: Sequence[str] = DEFAULT_ELEMENTS,
    max_strain: float = 0.03,
    rattle: tuple[float, float] = (0.05, 0.15),
    root: str | os.PathLike = "data",
) -> list[Atoms]:
    """Return the EMT dataset, generating and caching it on first use.

    Args:
        path: the extxyz cache file; None uses ``<root>/emt/emt_<hash of the options>.extxyz``. An existing
            file is read as it is; a missing one is generated with the options below and written there.
        seed: seed of the numpy random generator; same options → identical structures and labels.
        n_structures: number of structures.
        elements: fcc metals to use, a subset of :data:`SUPPORTED_ELEMENTS`.
        max_strain: largest strain component (dimensionless; 0.03 = ±3%).
        rattle: range (Å) from which each structure's root-mean-square displacement length per atom is
            drawn (the standard deviation per Cartesian component is that value / √3).
        root: data root holding the ``emt/`` cache folder.

    Returns:
        ``n_structures`` labelled ``ase.Atoms``; ``info`` holds ``source``, ``frame``, ``config_type``
        and ``dataset="emt"``.
    """
    options = _options(seed, n_structures, elements, max_strain, rattle)
    if path is None:
        path = Path(root) / "emt" / f"emt_{options_hash(options)}.extxyz"
    path = Path(path)
    if not path.is_file():
        _write_atomically(generate(**options), path)
    images = ase_files.read(path)
    for atoms in images:
        atoms.info["dataset"] = "emt"
    return images


def generate(
    *,
    seed: int = 0,
    n_structures: int = 400,
    elements: Sequence[str] = DEFAULT_ELEMENTS,
    max_strain: float = 0.03,
    rattle: tuple[float, float] = (0.05, 0.15),
) -> list[Atoms]:
    """Generate and label the structures (no file is written); arguments as in :func:`read`.

    Structure ``i`` depends only on ``(seed, i)`` and the options, so a smaller set is a prefix of a larger.
    """
    options = _options(seed, n_structures, elements, max_strain, rattle)
    images = []
    for i in range(options["n_structures"]):
        rng = np.random.default_rng((options["seed"], i))
        kind = KIND_CYCLE[i % len(KIND_CYCLE)]
        atoms = _build(kind, rng, options)
        label(atoms, record=i)
        atoms.info["config_type"] = kind
        images.append(atoms)
    return images


def label(atoms: Atoms, *, record: int = 0) -> Atoms:
    """Label ``atoms`` in place with EMT: energy (eV), forces (eV/Å), and stress (eV/Å³) if fully periodic."""
    atoms.calc = EMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=True) if atoms.pbc.all() else None
    return attach_labels(atoms, source="EMT", record=record, energy=energy, forces=forces, stress=stress)


def lattice_constant(symbols: Sequence[str]) -> float:
    """Vegard-law fcc lattice constant (Å): the mean of ``ase.build.bulk``'s values over the given atoms."""
    return float(np.mean([reference_states[atomic_numbers[s]]["a"] for s in symbols]))


def options_hash(options: dict) -> str:
    """Short stable hash of the generation options (and the generator version), used in the cache name."""
    text = json.dumps({"version": GENERATOR_VERSION, **options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _options(
    seed: int, n_structures: int, elements: Sequence[str], max_strain: float, rattle: tuple[float, float]
) -> dict:
    """Normalise and check the options (elements sorted and de-duplicated, numbers as plain Python types)."""
    if isinstance(elements, str):
        elements = (elements,)
    unknown = sorted(set(elements) - set(SUPPORTED_ELEMENTS))
    if unknown or not elements:
        raise ValueError(
            f"EMT dataset: elements {unknown or '[]'} not supported; choose from {SUPPORTED_ELEMENTS}"
        )
    if int(n_structures) < 1:
        raise ValueError(f"EMT dataset: n_structures must be at least 1, got {n_structures}")
    low, high = (float(x) for x in rattle)
    if not 0.0 <= low <= high:
        raise ValueError(
            f"EMT dataset: rattle must be a range (low, high) with 0 <= low <= high, got {rattle}"
        )
    if not 0.0 <= float(max_strain) < 0.5:
        raise ValueError(f"EMT dataset: max_strain must be in [0, 0.5), got {max_strain}")
    return {
        "seed": int(seed),
        "n_structures": int(n_structures),
        "elements": sorted(set(elements), key=lambda s: atomic_numbers[s]),
        "max_strain": float(max_strain),
        "rattle": [low, high],
    }


def _build(kind: str, rng: np.random.Generator, options: dict) -> Atoms:
    """One unlabelled structure of the given kind."""
    if kind == "slab":
        builder = SLAB_BUILDERS[rng.integers(len(SLAB_BUILDERS))]
        size = SLAB_SIZES[rng.integers(len(SLAB_SIZES))]
        n_atoms = int(np.prod(size))
        symbols = _composition(rng, options["elements"], n_atoms)
        atoms = builder(symbols[0], size=size, a=lattice_constant(symbols), vacuum=SLAB_VACUUM)
        atoms.set_chemical_symbols(symbols)
        _strain(atoms, rng, options["max_strain"], in_plane=True)
    else:
        if kind == "vacancy":
            cubic, repeats = VACANCY_CELLS[rng.integers(len(VACANCY_CELLS))]
        else:
            cells, weights = zip(*BULK_CELLS, strict=True)
            cubic, repeats = cells[rng.choice(len(cells), p=np.asarray(weights) / np.sum(weights))]
        n_atoms = (4 if cubic else 1) * int(np.prod(repeats))
        symbols = _composition(rng, options["elements"], n_atoms)
        atoms = bulk(symbols[0], "fcc", a=lattice_constant(symbols), cubic=cubic).repeat(repeats)
        atoms.set_chemical_symbols(symbols)
        if kind == "vacancy":
            del atoms[int(rng.integers(len(atoms)))]
        _strain(atoms, rng, options["max_strain"], in_plane=False)
    # A clean copy: no layer tags from the slab builders, no initial magnetic moments from bulk().
    atoms = Atoms(
        symbols=atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
    )
    # Gaussian displacements whose root-mean-square length per atom is drawn from the rattle range.
    sigma = rng.uniform(*options["rattle"]) / np.sqrt(3.0)
    atoms.positions += rng.normal(0.0, sigma, size=atoms.positions.shape)
    atoms.wrap()
    return atoms


def _composition(rng: np.random.Generator, elements: Sequence[str], n_atoms: int) -> list[str]:
    """Site symbols: one element (probability :data:`PURE_FRACTION`) or a random alloy of 2+ elements."""
    if len(elements) == 1 or rng.random() < PURE_FRACTION:
        return [elements[rng.integers(len(elements))]] * n_atoms
    n_species = int(rng.integers(2, len(elements) + 1))
    species = rng.choice(elements, size=n_species, replace=False)
    fractions = rng.dirichlet(np.ones(n_species))
    return [str(s) for s in rng.choice(species, size=n_atoms, p=fractions)]


def _strain(atoms: Atoms, rng: np.random.Generator, max_strain: float, *, in_plane: bool) -> None:
    """Apply a random symmetric strain (diagonal up to ±max_strain, shear up to ±max_strain/2) in place."""
    eps = np.diag(rng.uniform(-max_strain, max_strain, size=3))
    shear = rng.uniform(-max_strain / 2, max_strain / 2, size=3)
    for (i, j), value in zip(((1, 2), (0, 2), (0, 1)), shear, strict=True):
        eps[i, j] = eps[j, i] = value
    if in_plane:  # keep the vacuum direction of a slab untouched
        eps[2, :] = eps[:, 2] = 0.0
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)


def _write_atomically(images: list[Atoms], path: Path) -> None:
    """Write the extxyz cache via a temporary file, so readers never see a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp, images, format="extxyz")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
