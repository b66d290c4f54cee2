"""Real DFT data sets of the accuracy part: which frames train, validate and test, written as extxyz.

Every set is read from the shared data folder (:func:`benchmarks.structures.shared_data_dir`), converted to eV,
eV/Å and eV/Å³ (ASE's stress sign), split deterministically and written once per run for every framework:

* ``rmd17:<molecule>`` (revised MD17, official split 01, ``rmd17/npz``): 50 validation frames drawn from
  ``train_01`` with a fixed seed, the rest of ``train_01`` (950) trains; the whole ``test_01`` (1000) tests.
* ``acac`` (acetylacetone, ``acac/``): ``train_300K`` (500) less 50 validation frames trains; tested on
  ``test_MD_300K`` and ``test_MD_600K`` (650 each), the second one hotter than anything trained on.
* ``ta`` and ``inp`` (periodic with stress, ``periodic/``): two splits each, ``random`` (80/10/10 from a fixed
  seed) and ``group`` (whole ``config_type`` groups, drawn with the same seed, held out for testing until they hold
  at least 10 % of the frames; the rest split 9 : 1 into train and validation).
* ``md17-ethanol``: the original MD17 ethanol sample with random 950/50/1000 splits (the accuracy part's set
  before real-data sets were added).

``--datasets`` takes a comma-separated list; a name followed by ``:`` selects members, and further comma-separated
words that are not set names continue that selection: ``rmd17:aspirin,ethanol,acac,ta:group``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase import units

from benchmarks.structures import CACHE_DIR, SEED, _label, md17_ethanol_frames, shared_data_dir

RMD17_MOLECULES = ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde", "naphthalene", "paracetamol",
                   "salicylic", "toluene", "uracil")
RMD17_VAL = 50
ACAC_VAL = 50
PERIODIC_FILES = {"ta": "Ta_Linear_JCP2014.extxyz", "inp": "InP_JPCA2020.extxyz"}
PERIODIC_SPLITS = ("random", "group")
GROUP_TEST_FRACTION = 0.10

#: Test force MAE (meV/Å) of converged MACE models trained on 1000 rMD17 configurations: Batatia et al., "MACE:
#: Higher order equivariant message passing neural networks for fast and accurate force fields", NeurIPS 2022,
#: table 1 (as quoted in rmd17/npz/PROVENANCE.md of the shared data). Days of GPU training, not equal time.
PUBLISHED_SOURCE = "MACE paper (Batatia et al. 2022) table 1, converged"
PUBLISHED_F_MAE: dict[str, float] = {
    "rmd17-aspirin": 6.6, "rmd17-azobenzene": 3.0, "rmd17-benzene": 0.3, "rmd17-ethanol": 2.1,
    "rmd17-malonaldehyde": 4.1, "rmd17-naphthalene": 1.6, "rmd17-paracetamol": 4.8, "rmd17-salicylic": 3.1,
    "rmd17-toluene": 1.5, "rmd17-uracil": 2.1,
}

#: The set list of the accuracy part when ``--datasets quick`` is given (about 20 minutes on 2 cores with the
#: quick models and a 60 s budget).
QUICK_DATASETS = "rmd17:aspirin,acac,ta:random"


@dataclass(frozen=True)
class Task:
    """One training set, its validation set and its test sets.

    Attributes:
        name: label in reports, e.g. ``rmd17-aspirin``, ``acac``, ``ta-group``.
        dataset: the set it comes from (``rmd17``, ``acac``, ``ta``, ``inp``, ``md17-ethanol``).
        member: molecule (rmd17) or split kind (``random``/``group`` for the periodic sets); empty otherwise.
        tests: names of the test sets, the first one being the headline test.
        stress: the frames carry stress labels (trained on and reported).
        per_atom_energy: energy errors are reported per atom (sets of very different cell sizes).
    """

    name: str
    dataset: str
    member: str = ""
    tests: tuple[str, ...] = ("test",)
    stress: bool = False
    per_atom_energy: bool = False
    notes: dict = field(default_factory=dict, compare=False)


def published_force_mae(task_name: str) -> float | None:
    """Published converged MACE test force MAE (meV/Å) for ``task_name``, or None where none is known."""
    return PUBLISHED_F_MAE.get(task_name)


def _task(dataset: str, member: str = "") -> Task:
    if dataset == "rmd17":
        if member not in RMD17_MOLECULES:
            raise ValueError(f"--datasets: unknown rMD17 molecule {member!r}; choose from {', '.join(RMD17_MOLECULES)}")
        return Task(f"rmd17-{member}", "rmd17", member)
    if dataset == "acac":
        if member:
            raise ValueError(f"--datasets: acac takes no member, got {member!r}")
        return Task("acac", "acac", tests=("test_MD_300K", "test_MD_600K"))
    if dataset in PERIODIC_FILES:
        if member not in PERIODIC_SPLITS:
            raise ValueError(f"--datasets: {dataset} split must be one of {PERIODIC_SPLITS}, got {member!r}")
        return Task(f"{dataset}-{member}", dataset, member, stress=True, per_atom_energy=True)
    if dataset == "md17-ethanol":
        return Task("md17-ethanol", "md17-ethanol")
    raise ValueError(f"--datasets: unknown data set {dataset!r}; choose from rmd17, acac, ta, inp, md17-ethanol")


DATASETS = ("rmd17", "acac", "ta", "inp", "md17-ethanol")
_ALL_MEMBERS = {"rmd17": RMD17_MOLECULES, "ta": PERIODIC_SPLITS, "inp": PERIODIC_SPLITS}


def parse_datasets(spec: str) -> list[Task]:
    """Tasks named by a ``--datasets`` value (``quick`` stands for :data:`QUICK_DATASETS`).

    A bare set name with members (``rmd17``, ``ta``, ``inp``) means all of them; ``periodic`` means ``ta`` and
    ``inp`` (``periodic:random``: their random splits).
    """
    spec = QUICK_DATASETS if spec.strip() == "quick" else spec
    chosen: list[tuple[str, list[str]]] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        name, colon, member = word.partition(":")
        if name == "periodic":  # the shared folder's name: both periodic sets
            chosen += [(n, [member] if colon and member else []) for n in ("ta", "inp")]
        elif name in DATASETS:
            chosen.append((name, [member] if colon and member else []))
        elif chosen and not colon and chosen[-1][1]:
            chosen[-1][1].append(word)
        else:
            raise ValueError(f"--datasets: {word!r} is neither a data set ({', '.join(DATASETS)}, periodic) "
                             "nor a member of the set named before it")
    tasks: list[Task] = []
    for name, members in chosen:
        for member in members or _ALL_MEMBERS.get(name, ("",)):
            task = _task(name, member)
            if task not in tasks:
                tasks.append(task)
    return tasks


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data file missing: {path}; the shared data folder is incomplete")
    return path


def rmd17_frames(molecule: str, part: str) -> list[ase.Atoms]:
    """Frames of ``rmd17/npz/rmd17_<molecule>_<part>_01.npz`` (``part`` train or test) in eV and eV/Å."""
    path = _need(shared_data_dir() / "rmd17" / "npz" / f"rmd17_{molecule}_{part}_01.npz")
    data = np.load(path)
    for key in ("nuclear_charges", "coords", "energies", "forces"):
        if key not in data.files:
            raise ValueError(f"{path}: field {key!r} missing (has {sorted(data.files)}); expected rMD17's npz layout")
    conv = units.kcal / units.mol
    z = data["nuclear_charges"].astype(int)
    return [_label(ase.Atoms(numbers=z, positions=data["coords"][k], pbc=False), float(data["energies"][k]) * conv,
                   data["forces"][k] * conv) for k in range(len(data["energies"]))]


def read_labelled(path: Path) -> list[ase.Atoms]:
    """All frames of an extxyz file, each checked for energy and forces."""
    frames = ase.io.read(_need(path), index=":")
    for k, atoms in enumerate(frames):
        res = atoms.calc.results if atoms.calc is not None else {}
        missing = [key for key in ("energy", "forces") if key not in res]
        if missing:
            raise ValueError(f"{path}: frame {k} has no {' or '.join(missing)} label; every training and test "
                             "frame needs energy (eV) and forces (eV/Å)")
    return frames


def _take(frames: list, idx) -> list:
    return [frames[int(k)] for k in idx]


def holdout(n: int, n_val: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: ``n_val`` of ``range(n)`` drawn with ``seed`` for validation, the rest (sorted) train."""
    if n_val >= n:
        raise ValueError(f"cannot hold out {n_val} validation frames from {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def random_split(n: int, fractions=(0.8, 0.1, 0.1), seed: int = SEED) -> tuple[np.ndarray, ...]:
    """(train, val, test) indices of a random split of ``range(n)`` with the given fractions."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return tuple(np.sort(p) for p in (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]))


def group_split(groups: list[str], test_fraction: float = GROUP_TEST_FRACTION, seed: int = SEED
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train, val, test, held-out groups): whole groups, in a seeded order, go to test until it holds at least
    ``test_fraction`` of the frames; the other frames split 9 : 1 at random into train and validation."""
    names = sorted(set(groups))
    if len(names) < 2:
        raise ValueError(f"a group split needs at least two config_type groups, found {names}")
    order = [names[k] for k in np.random.default_rng(seed).permutation(len(names))]
    labels = np.asarray(groups)
    held: list[str] = []
    for name in order[:-1]:  # at least one group stays for training
        held.append(name)
        if np.isin(labels, held).sum() >= test_fraction * len(groups):
            break
    test = np.flatnonzero(np.isin(labels, held))
    rest = np.flatnonzero(~np.isin(labels, held))
    perm = np.random.default_rng(seed + 1).permutation(len(rest))
    n_val = max(1, int(round(len(rest) / 10)))
    return np.sort(rest[perm[n_val:]]), np.sort(rest[perm[:n_val]]), test, sorted(held)


def split_frames(task: Task, seed: int = SEED) -> dict:
    """``{"train": frames, "val": frames, "tests": {name: frames}, "notes": {...}}`` of ``task``."""
    root = shared_data_dir()
    notes: dict = {}
    if task.dataset == "rmd17":
        pool = rmd17_frames(task.member, "train")
        tr, va = holdout(len(pool), RMD17_VAL, seed)
        train, val, tests = _take(pool, tr), _take(pool, va), {"test": rmd17_frames(task.member, "test")}
        notes["source"] = f"rmd17/npz rmd17_{task.member}_{{train,test}}_01.npz"
    elif task.dataset == "acac":
        pool = read_labelled(root / "acac" / "train_300K.xyz")
        tr, va = holdout(len(pool), ACAC_VAL, seed)
        train, val = _take(pool, tr), _take(pool, va)
        tests = {name: read_labelled(root / "acac" / f"{name}.xyz") for name in task.tests}
        notes["source"] = "acac/train_300K.xyz; tests acac/test_MD_300K.xyz, acac/test_MD_600K.xyz"
    elif task.dataset in PERIODIC_FILES:
        path = root / "periodic" / PERIODIC_FILES[task.dataset]
        pool = read_labelled(path)
        for k, atoms in enumerate(pool):
            if "stress" not in atoms.calc.results:
                raise ValueError(f"{path}: frame {k} has no stress label; the periodic sets are trained with stress")
        if task.member == "random":
            tr, va, te = random_split(len(pool), seed=seed)
        else:
            groups = []
            for k, atoms in enumerate(pool):
                if "config_type" not in atoms.info:
                    raise ValueError(f"{path}: frame {k} has no config_type in its comment line; the group split "
                                     "needs one per frame")
                groups.append(str(atoms.info["config_type"]))
            tr, va, te, held = group_split(groups, seed=seed)
            notes["held_out_groups"] = held
        train, val, tests = _take(pool, tr), _take(pool, va), {"test": _take(pool, te)}
        notes["source"] = f"periodic/{PERIODIC_FILES[task.dataset]}"
    elif task.dataset == "md17-ethanol":
        frames = md17_ethanol_frames()
        perm = np.random.default_rng(seed).permutation(len(frames))
        train, val = _take(frames, perm[:950]), _take(frames, perm[950:1000])
        tests = {"test": _take(frames, perm[1000:2000])}
        notes["source"] = "md17/md17_ethanol_first2000.npz"
    else:
        raise ValueError(f"unknown data set {task.dataset!r}")
    return {"train": train, "val": val, "tests": tests, "notes": notes}


def write_task(task: Task, out_dir: Path | str = CACHE_DIR, seed: int = SEED) -> dict:
    """Write the frames of ``task`` as ``<out_dir>/<task>_{train,val,<test name>}.extxyz``.

    Returns:
        ``{"train": path, "val": path, "tests": {name: path}, "sizes": {...}, "notes": {...}}`` (paths as str).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = split_frames(task, seed)
    out: dict = {"tests": {}, "sizes": {}, "notes": parts["notes"]}
    for split in ("train", "val"):
        path = out_dir / f"{task.name}_{split}.extxyz"
        ase.io.write(path, parts[split], format="extxyz")
        out[split] = str(path)
        out["sizes"][split] = len(parts[split])
    for name, frames in parts["tests"].items():
        path = out_dir / f"{task.name}_{name}.extxyz"
        ase.io.write(path, frames, format="extxyz")
        out["tests"][name] = str(path)
        out["sizes"][name] = len(frames)
    return out
