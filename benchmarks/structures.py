"""The standard benchmark structures, built deterministically and written as extxyz for every framework.

* ``si64``: Si diamond, 2x2x2 conventional cubic cells (a = 5.43 Å), 64 atoms, rattled by 0.01 Å.
* ``cu500``: Cu fcc, 5x5x5 conventional cubic cells (a = 3.61 Å), 500 atoms, rattled by 0.01 Å,
  labelled with ASE's EMT (energy eV, forces eV/Å, stress eV/Å³) so training steps have real targets.
* ``ethanol``: frame 0 of the MD17 ethanol sample (kcal/mol converted to eV with ``ase.units``).
* ``oc20``: frame 0 of the 17-atom OC20 Rb-slab + O relaxation (raw DFT energy, eV).

The shared data folder is ``<project root>/../shared/data`` unless ``POTENTIALS_SHARED_DATA`` names another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
MD17_FILE = ("md17", "md17_ethanol_first2000.npz")
OC20_FILE = ("oc20", "oc20_is2res_random1447590.traj")
RATTLE_STDEV = 0.01  # Å
SEED = 1234


def shared_data_dir() -> Path:
    """Folder of the shared real-data samples.

    Raises:
        FileNotFoundError: if neither ``$POTENTIALS_SHARED_DATA`` nor ``<project root>/../shared/data`` exists.
    """
    env = os.environ.get("POTENTIALS_SHARED_DATA")
    path = Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        source = "$POTENTIALS_SHARED_DATA" if env else "<project root>/../shared/data"
        raise FileNotFoundError(
            f"shared data folder not found at {path} (from {source}); set POTENTIALS_SHARED_DATA to the folder "
            "holding md17/ and oc20/"
        )
    return path


def _data_file(parts: tuple[str, str]) -> Path:
    path = shared_data_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data file missing: {path}; the shared data folder is incomplete")
    return path


def _label(atoms: ase.Atoms, energy: float, forces: np.ndarray, stress: np.ndarray | None = None) -> ase.Atoms:
    results = {"energy": float(energy), "forces": np.asarray(forces, dtype=np.float64)}
    if stress is not None:
        results["stress"] = np.asarray(stress, dtype=np.float64)
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def si64() -> ase.Atoms:
    """64-atom Si diamond cell, rattled, no labels."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.rattle(stdev=RATTLE_STDEV, seed=SEED)
    return atoms


def cu500() -> ase.Atoms:
    """500-atom Cu fcc cell, rattled, labelled with EMT."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((5, 5, 5))
    atoms.rattle(stdev=RATTLE_STDEV, seed=SEED)
    atoms.calc = EMT()
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    return _label(atoms, energy, forces, stress)


def cu_supercell(n: int, a: float = 3.61) -> ase.Atoms:
    """Cu fcc with ``n`` conventional cubic cells per side (4·n³ atoms), unrattled."""
    return bulk("Cu", "fcc", a=a, cubic=True).repeat((n, n, n))


def md17_ethanol_frames(indices: np.ndarray | list[int] | None = None) -> list[ase.Atoms]:
    """MD17 ethanol frames with energy (eV) and forces (eV/Å); all 2000 if ``indices`` is None."""
    data = np.load(_data_file(MD17_FILE))
    conv = units.kcal / units.mol
    idx = np.arange(len(data["R"])) if indices is None else np.asarray(indices)
    frames = []
    for k in idx:
        atoms = ase.Atoms(numbers=data["z"].astype(int), positions=data["R"][k], pbc=False)
        frames.append(_label(atoms, float(data["E"][k].reshape(-1)[0]) * conv, data["F"][k] * conv))
    return frames


def ethanol() -> ase.Atoms:
    """Frame 0 of MD17 ethanol (9 atoms, non-periodic)."""
    return md17_ethanol_frames([0])[0]


def oc20_slab() -> ase.Atoms:
    """Frame 0 of the OC20 Rb-slab + O relaxation (17 atoms, periodic, 10 atoms fixed)."""
    atoms = ase.io.read(_data_file(OC20_FILE), index=0)
    res = atoms.calc.results
    return _label(atoms, res["energy"], res["forces"])


STRUCTURES: dict[str, Callable[[], ase.Atoms]] = {
    "si64": si64,
    "cu500": cu500,
    "ethanol": ethanol,
    "oc20": oc20_slab,
}


def build(name: str) -> ase.Atoms:
    """The benchmark structure ``name`` (one of ``STRUCTURES``)."""
    if name not in STRUCTURES:
        raise KeyError(f"unknown benchmark structure {name!r}; choose from {sorted(STRUCTURES)}")
    return STRUCTURES[name]()


def write_structure(name: str, out_dir: Path | str = CACHE_DIR) -> Path:
    """Write structure ``name`` to ``<out_dir>/<name>.extxyz`` and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.extxyz"
    ase.io.write(path, build(name), format="extxyz")
    return path


def write_md17_splits(
    out_dir: Path | str = CACHE_DIR, n_train: int = 950, n_val: int = 50, n_test: int = 1000, seed: int = SEED
) -> dict[str, Path]:
    """Random disjoint train/val/test splits of the MD17 ethanol sample, written as extxyz.

    Returns:
        ``{"train": path, "val": path, "test": path}``.
    """
    total = n_train + n_val + n_test
    frames = md17_ethanol_frames()
    if total > len(frames):
        raise ValueError(f"splits ask for {total} frames but the MD17 sample holds {len(frames)}")
    perm = np.random.default_rng(seed).permutation(len(frames))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, total)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, (lo, hi) in bounds.items():
        paths[split] = out_dir / f"md17_ethanol_{split}.extxyz"
        ase.io.write(paths[split], [frames[k] for k in perm[lo:hi]], format="extxyz")
    return paths
