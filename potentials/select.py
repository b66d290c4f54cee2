"""Pick the frames a reference code should label next: the most uncertain, but not many copies of one event.

:func:`select_frames` scores every frame by the model's maximum per-atom force std (a committee or shallow ensemble,
:mod:`potentials.uncertainty`), then picks greedily from the highest score down, skipping a frame that is within
``min_distance`` (Å, RMS over atoms of the minimum-image displacement) of a frame already picked with the same atoms
in the same order: consecutive MD frames of one event differ by far less than that, different events by more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ase
import numpy as np

from potentials.errors import PotentialsInputError


@dataclass
class Selection:
    """The picked frames' indices (into the input, in picking order), every frame's score (eV/Å), and the
    number of frames skipped as too close to a picked one."""

    indices: list[int]
    scores: np.ndarray
    skipped_as_similar: int


def frame_scores(frames: Sequence[ase.Atoms], calc) -> np.ndarray:
    """Maximum per-atom force std (eV/Å) of each frame under ``calc`` (a calculator of a model with uncertainty)."""
    from potentials.uncertainty import EnsemblePotential

    if not isinstance(getattr(calc, "potential", None), EnsemblePotential):
        raise PotentialsInputError("selection by uncertainty needs a model with uncertainty (trained with "
                                   "ensemble.size > 1: a committee or a shallow ensemble); this model gives none")
    scores = np.empty(len(frames))
    for k, atoms in enumerate(frames):
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_forces()
        scores[k] = float(np.max(calc.results["forces_std"])) if len(atoms) else 0.0
    return scores


def rms_distance(a: ase.Atoms, b: ase.Atoms) -> float:
    """RMS over atoms of the displacement between two frames with the same atoms (minimum image in a's cell where
    periodic); infinite when the atoms differ."""
    if len(a) != len(b) or not np.array_equal(a.numbers, b.numbers):
        return float("inf")
    d = b.positions - a.positions
    if np.any(a.pbc) and a.cell.rank == 3:
        frac = np.linalg.solve(a.cell.array.T, d.T).T
        frac -= np.where(a.pbc, np.round(frac), 0.0)
        d = frac @ a.cell.array
    return float(np.sqrt((d ** 2).sum(axis=1).mean()))


def select_frames(frames: Sequence[ase.Atoms], scores: np.ndarray, n: int, min_distance: float = 0.1) -> Selection:
    """Up to ``n`` frames, highest score first, none within ``min_distance`` Å of an earlier pick (0: no rule)."""
    if n < 1:
        raise PotentialsInputError(f"--n must be at least 1, got {n}")
    picked: list[int] = []
    skipped = 0
    for k in np.argsort(-np.asarray(scores), kind="stable"):
        if len(picked) == n:
            break
        if min_distance > 0 and any(rms_distance(frames[j], frames[k]) < min_distance for j in picked):
            skipped += 1
            continue
        picked.append(int(k))
    return Selection(picked, np.asarray(scores), skipped)
