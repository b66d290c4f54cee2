"""Reproducible train/val/test splits: by fractions, counts or index files, optionally grouped (e.g. by material)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def read_index_file(path: str | Path) -> np.ndarray:
    """Integers, one per line (rMD17 split CSV style); blank lines and '#' comments ignored."""
    path = Path(path)
    values = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#")[0].strip().rstrip(",")
        if not text:
            continue
        try:
            values.append(int(text))
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: expected one integer index per line, got {line!r}") from err
    return np.asarray(values, dtype=np.int64)


def _amount(value: float | int | None, total: int, name: str) -> int | None:
    """A float is a fraction of ``total``, an int a count; None means "the rest"."""
    if value is None:
        return None
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"split.{name}: a fraction must lie in [0, 1], got {value} (give an int for a count)")
        return int(round(value * total))
    if int(value) < 0:
        raise ValueError(f"split.{name}: a count must be non-negative, got {value}")
    return int(value)


def make_splits(
    n: int,
    *,
    train: float | int | None = None,
    val: float | int = 0.1,
    test: float | int = 0.1,
    seed: int = 0,
    index_files: dict[str, str] | None = None,
    groups: Sequence | None = None,
) -> dict[str, np.ndarray]:
    """Indices of the train/val/test splits of ``n`` records.

    Args:
        n: number of records.
        train, val, test: a fraction of all records (float < 1) or a count (int). ``train=None`` takes the rest.
        seed: permutation seed.
        index_files: ``{split: path}`` of index files; splits not given are drawn from what is left (val from the
            remaining records, e.g. when only train and test files exist).
        groups: one key per record (e.g. a material id); when given, whole groups go to one split, so frames of
            one material never leak across splits. Amounts then count groups.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}`` as sorted int64 arrays, pairwise disjoint.
    """
    rng = np.random.default_rng(seed)
    fixed: dict[str, np.ndarray] = {}
    for name, path in (index_files or {}).items():
        if name not in SPLITS:
            raise ValueError(f"split.index_files: unknown split {name!r}; use train, val or test")
        if path is None:
            continue
        idx = read_index_file(path)
        bad = idx[(idx < 0) | (idx >= n)]
        if len(bad):
            raise ValueError(f"{path}: index {int(bad[0])} out of range for a dataset of {n} records")
        fixed[name] = idx
    used = np.concatenate(list(fixed.values())) if fixed else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), used)
    if groups is not None:
        keys = np.asarray([str(g) for g in groups])
        units = np.unique(keys[rest])
    else:
        units = rest
    units = units[rng.permutation(len(units))]
    amounts = {"val": val, "test": test, "train": train}
    out = dict(fixed)
    start = 0
    for name in ("val", "test", "train"):
        if name in out:
            continue
        k = _amount(amounts[name], len(units), name)
        k = len(units) - start if k is None else k
        if start + k > len(units):
            raise ValueError(
                f"split.{name}: asked for {k} but only {len(units) - start} "
                f"{'groups' if groups is not None else 'records'} are left (of {len(units)})"
            )
        chosen = units[start:start + k]
        start += k
        out[name] = np.flatnonzero(np.isin(keys, chosen)) if groups is not None else chosen
    return {name: np.sort(out[name]).astype(np.int64) for name in SPLITS}
