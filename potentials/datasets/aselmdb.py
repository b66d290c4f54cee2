"""ASE-LMDB (``*.aselmdb``): fairchem's ASE-database backend on LMDB, read and written with the ``lmdb`` package.

The format (fairchem ``LMDBDatabase``, an ASE ``Database`` modelled on ASE's JSON backend):

* one LMDB environment stored as a single file (``subdir=False``);
* keys are ASCII strings: row ids ``"1"``, ``"2"``, … plus the reserved ``"nextid"`` (the next free id),
  ``"metadata"`` (a dict) and ``"deleted_ids"`` (a list of ids whose keys were removed);
* every value is ``zlib.compress(json)`` of the row dictionary of an ASE database row: ``numbers``,
  ``positions`` (Å), ``cell`` (Å), ``pbc``, ``unique_id``, ``ctime``, ``mtime``, ``user``, the calculator name
  and results (``energy``, ``free_energy`` eV, ``forces`` eV/Å, ``stress`` Voigt eV/Å³, ``magmoms``, …), the
  optional per-atom ``tags``, ``initial_magmoms``, ``momenta``, ``masses``, ``charges``, ``constraints``
  (``[{"name": "FixAtoms", "kwargs": {"indices": [...]}}]``), ``key_value_pairs`` and ``data``.
  Newer files (orjson with numpy serialisation) store arrays as nested lists; older ones use ASE's
  ``{"__ndarray__": [shape, dtype, flat values]}`` encoding. Both are read.

Rows are read in id order ``1 … nextid−1`` (deleted ids skipped) one at a time, so a file of any size streams.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import dict2constraint
from ase.db.core import now
from ase.io.jsonio import decode

from potentials.datasets.validate import InvalidRecordError, open_lmdb_file, where

RESERVED_KEYS = (b"nextid", b"metadata", b"deleted_ids")
#: Calculator results carried over to the SinglePointCalculator.
RESULT_KEYS = ("energy", "free_energy", "forces", "stress", "magmoms", "magmom", "dipole", "charges")
#: Per-atom arrays an ASE row may hold besides numbers and positions.
ARRAY_KEYS = ("tags", "initial_magmoms", "momenta", "masses", "initial_charges")
_MAP_SIZE = 1 << 40  # address space only; the file grows as rows are written


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any] | InvalidRecordError]]:
    """``(row id, row dict)`` for every row, in id order; an undecodable row yields an ``InvalidRecordError``.

    Raises:
        ValueError: the file is not an LMDB environment, or its ``nextid`` entry is unreadable.
    """
    path = Path(path)
    env = open_lmdb_file(path)
    try:
        with env.begin(write=False) as txn:
            ids = _row_ids(txn, path.name)
            for row_id in ids:
                value = txn.get(str(row_id).encode("ascii"))
                if value is None:
                    continue  # a deleted row
                try:
                    yield row_id, _decode(value)
                except Exception as exc:  # zlib/json raise several types on damaged values
                    yield row_id, InvalidRecordError(
                        f"{where(path.name, row_id, 'row')}: cannot be decoded ({type(exc).__name__}: {exc})",
                        source=path.name, record=row_id, field="row")
    finally:
        env.close()


def _row_ids(txn: Any, source: str) -> Iterable[int]:
    raw = txn.get(b"nextid")
    if raw is not None:
        try:
            nextid = int(_decode(raw))
        except Exception as exc:
            raise ValueError(f"{where(source, field='nextid')}: unreadable ({exc})") from None
        deleted = txn.get(b"deleted_ids")
        skip = set(_decode(deleted)) if deleted is not None else set()
        return (i for i in range(1, nextid) if i not in skip)
    # no "nextid": fall back to the keys present (collected as integers to restore numeric order)
    with txn.cursor() as cursor:
        return sorted(int(key) for key in cursor.iternext(keys=True, values=False)
                      if key not in RESERVED_KEYS and key.isdigit())


def _decode(value: bytes) -> Any:
    return decode(zlib.decompress(value).decode("utf-8"))


def row_to_atoms(row: dict[str, Any]) -> Atoms:
    """A decoded row → ``ase.Atoms`` with constraints, tags and a ``SinglePointCalculator`` of its results.

    ``key_value_pairs`` go to ``atoms.info``; ``data`` to ``atoms.info["data"]`` (a dict). Results are copied as
    stored (no constraint is applied to forces).
    """
    atoms = Atoms(numbers=np.asarray(row["numbers"], dtype=int), positions=np.asarray(row["positions"], float),
                  cell=np.asarray(row.get("cell", np.zeros((3, 3))), float),
                  pbc=np.asarray(row.get("pbc", False), dtype=bool))
    for key in ARRAY_KEYS:
        if row.get(key) is not None:
            atoms.set_array(key, np.asarray(row[key]))
    if row.get("constraints"):
        atoms.set_constraint([dict2constraint(c) for c in row["constraints"]])
    results = {key: np.asarray(row[key], dtype=float) if np.ndim(row[key]) else float(row[key])
               for key in RESULT_KEYS if row.get(key) is not None}
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info.update(row.get("key_value_pairs") or {})
    if row.get("data"):
        atoms.info["data"] = dict(row["data"])
    return atoms


def write(path: str | os.PathLike, images: Iterable[Atoms], *, data: Iterable[dict] | None = None) -> int:
    """Write ``images`` as a new ASE-LMDB file, in the layout fairchem writes (arrays as nested lists).

    Args:
        path: the ``.aselmdb`` file to create (an existing file is replaced).
        images: structures; calculator results, constraints and tags are stored, and the scalar values of
            ``atoms.info`` (str, int, float, bool) become the row's key-value pairs.
        data: optional per-image dicts stored as each row's ``data``.

    Returns:
        The number of rows written.
    """
    import lmdb

    path = Path(path)
    for stale in (path, Path(f"{path}-lock")):
        stale.unlink(missing_ok=True)
    env = lmdb.open(str(path), subdir=False, map_size=_MAP_SIZE, meminit=False)
    n = 0
    try:
        with env.begin(write=True) as txn:
            extras = iter(data) if data is not None else None
            for n, atoms in enumerate(images, start=1):
                row = _row_dict(atoms, next(extras) if extras is not None else None)
                txn.put(str(n).encode("ascii"), _encode(row))
            txn.put(b"nextid", _encode(n + 1))
            txn.put(b"metadata", _encode({}))
    finally:
        env.close()
    return n


def _row_dict(atoms: Atoms, data: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {"numbers": atoms.numbers, "positions": atoms.positions, "cell": atoms.cell.array,
                           "pbc": atoms.pbc, "unique_id": os.urandom(16).hex(), "user": os.environ.get("USER", ""),
                           "ctime": now(), "mtime": now()}
    for key in ARRAY_KEYS:
        if key in atoms.arrays and not (key == "tags" and not atoms.arrays[key].any()):
            row[key] = atoms.arrays[key]
    if atoms.constraints:
        row["constraints"] = [c.todict() for c in atoms.constraints]
    if atoms.calc is not None:
        row["calculator"] = "unknown"
        row["calculator_parameters"] = {}
        for key, value in atoms.calc.results.items():
            if key in RESULT_KEYS:
                row[key] = value
    kvp = {k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float, bool, np.integer, np.floating))}
    if kvp:
        row["key_value_pairs"] = kvp
    if data:
        row["data"] = data
    return row


def _encode(value: Any) -> bytes:
    return zlib.compress(json.dumps(value, default=_plain).encode("utf-8"))


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in an ASE-LMDB row")
