"""Label checks shared by the dataset adapters, and the one place labels are attached to ``ase.Atoms``.

Every error names the file, the record (frame) and the field, so a broken input can be found and fixed.
Labels end up on a :class:`~ase.calculators.singlepoint.SinglePointCalculator` in eV, eV/Å and eV/Å³
(ASE's stress sign, σ = (1/V)·∂E/∂ε, stored as the 6-component Voigt vector xx, yy, zz, yz, xz, xy).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers, chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from potentials.errors import PotentialsInputError

log = logging.getLogger(__name__)

#: Thomas–Fermi total energy of a neutral atom is −0.7687·Z^(7/3) Hartree; it bounds the all-electron
#: energy magnitude from above (the real energy is higher), so a total energy far beyond it cannot be in eV.
_THOMAS_FERMI_HARTREE = 0.7687
#: Headroom over the bound, for relativistic all-electron energies of heavy elements.
_BOUND_SAFETY = 1.5


class InvalidRecordError(PotentialsInputError):
    """A record of an input file is malformed; ``source``, ``record`` and ``field`` say where (None: unknown)."""

    def __init__(self, message: str, *, source: str, record: int | str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.source, self.record, self.field = source, record, field


def where(source: str, record: int | str | None = None, field: str | None = None) -> str:
    """Format a location for an error message, e.g. ``file 'a.npz', frame 3, field 'energies'``."""
    text = f"file '{source}'"
    if record is not None:
        text += f", frame {record}"
    if field is not None:
        text += f", field '{field}'"
    return text


def check_shape(
    array: np.ndarray, expected: Sequence[int | None], *, source: str, field: str, record: int | None = None
) -> None:
    """Raise ``ValueError`` unless ``array.shape`` matches ``expected`` (``None`` matches any length)."""
    shape = np.shape(array)
    ok = len(shape) == len(expected)
    ok = ok and all(e is None or e == s for e, s in zip(expected, shape, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise InvalidRecordError(f"{where(source, record, field)}: shape {shape}, expected {want}",
                                 source=source, record=record, field=field)


def check_finite(
    values: np.ndarray, *, source: str, field: str, frame_ids: Sequence[int | str] | None = None
) -> None:
    """Raise ``ValueError`` naming the first frame whose values contain NaN or inf.

    Args:
        values: array whose leading axis runs over frames, any trailing shape.
        source: file name used in the message.
        field: label name used in the message.
        frame_ids: index in the file of each row of ``values`` (default: the row number).
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return
    rows = values.reshape(len(values), -1)
    bad_rows = ~np.isfinite(rows).all(axis=1)
    if bad_rows.any():
        row = int(np.argmax(bad_rows))
        frame = row if frame_ids is None else frame_ids[row]
        frame = int(frame) if isinstance(frame, (int, np.integer)) else frame  # ids may be strings
        bad = rows[row][~np.isfinite(rows[row])][0]
        raise InvalidRecordError(
            f"{where(source, frame, field)}: value is not finite ({bad}); remove or repair that frame",
            source=source, record=frame, field=field,
        )


def as_voigt_stress(stress: np.ndarray, *, source: str, record: int | str, field: str = "stress") -> np.ndarray:
    """Return stress as the 6-component Voigt vector (xx, yy, zz, yz, xz, xy); accepts 6, 9 or 3×3 values."""
    stress = np.asarray(stress, dtype=float)
    if stress.shape == (6,):
        return stress
    if stress.shape in ((9,), (3, 3)):
        return full_3x3_to_voigt_6_stress(stress.reshape(3, 3))
    raise InvalidRecordError(
        f"{where(source, record, field)}: stress has shape {stress.shape}, expected 6 Voigt values or 3x3",
        source=source, record=record, field=field,
    )


def attach_labels(
    atoms: Atoms,
    *,
    source: str,
    record: int | str,
    energy: float | None = None,
    forces: np.ndarray | None = None,
    stress: np.ndarray | None = None,
) -> Atoms:
    """Check labels (already in eV units) and put them on a fresh ``SinglePointCalculator``.

    Args:
        atoms: the structure; its previous calculator, if any, is replaced.
        source: file name, for error messages.
        record: frame index in the file (or the record's id), for error messages.
        energy: total energy, eV, or None when the frame has no energy label.
        forces: [N, 3] eV/Å, or None.
        stress: 6 Voigt values or 3×3, eV/Å³ with ASE's sign, or None.

    Returns:
        The same ``atoms`` object. Absent labels are left absent (never replaced by zeros).
    """
    results: dict[str, float | np.ndarray] = {}
    if energy is not None:
        value = np.asarray(energy, dtype=float)
        if value.size != 1:
            raise InvalidRecordError(f"{where(source, record, 'energy')}: expected one number, got {value.shape}",
                                     source=source, record=record, field="energy")
        results["energy"] = float(value.reshape(()))
    if forces is not None:
        forces = np.array(forces, dtype=float)
        check_shape(forces, (len(atoms), 3), source=source, field="forces", record=record)
        results["forces"] = forces
    if stress is not None:
        results["stress"] = as_voigt_stress(stress, source=source, record=record)
    for field, value in results.items():
        check_finite(np.reshape(value, (1, -1)), source=source, field=field, frame_ids=[record])
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def max_plausible_energy(numbers: Sequence[int] | np.ndarray) -> float:
    """Upper bound (eV) on the magnitude of any total energy of a structure with these atomic numbers.

    The bound is the Thomas–Fermi all-electron energy of the isolated atoms with 50% headroom; chemical
    binding is a tiny fraction of it. Pseudopotential energies are far smaller still.
    """
    z = np.asarray(numbers, dtype=float)
    return float(_BOUND_SAFETY * _THOMAS_FERMI_HARTREE * units.Hartree * np.sum(z ** (7.0 / 3.0)))


#: Smallest cell volume (Å³) accepted for a periodic structure; below it the cell is degenerate.
MIN_CELL_VOLUME = 1e-6


def check_cell(cell: np.ndarray, pbc: Sequence[bool] | np.ndarray, *, source: str, record: int | str,
               field: str = "cell") -> np.ndarray:
    """Return ``cell`` as a finite [3, 3] float array (Å); periodic cells must enclose a volume.

    Raises:
        InvalidRecordError: wrong shape, non-finite entries, |det| < :data:`MIN_CELL_VOLUME` Å³ for a fully
            periodic cell, or dependent vectors along the periodic directions of a partly periodic one (a
            degenerate cell makes neighbour lists and stress meaningless).
    """
    try:
        cell = np.asarray(cell, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"{where(source, record, field)}: not a 3x3 array of numbers ({exc})",
                                 source=source, record=record, field=field) from None
    check_shape(cell, (3, 3), source=source, field=field, record=record)
    check_finite(cell.reshape(1, 9), source=source, field=field, frame_ids=[record])
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    volume = abs(float(np.linalg.det(cell)))
    if pbc.all() and volume < MIN_CELL_VOLUME:
        raise InvalidRecordError(
            f"{where(source, record, field)}: periodic cell has zero volume ({volume:.3g} Å³); "
            "its lattice vectors are linearly dependent", source=source, record=record, field=field)
    if pbc.any() and np.linalg.matrix_rank(cell[pbc], tol=1e-6) < pbc.sum():
        raise InvalidRecordError(
            f"{where(source, record, field)}: the lattice vectors of the periodic directions {pbc.tolist()} are "
            "zero or linearly dependent", source=source, record=record, field=field)
    return cell


def atomic_numbers_of(symbols: Sequence[str | int], *, source: str, record: int | str,
                      field: str = "species") -> np.ndarray:
    """Atomic numbers [N] (int64) of element symbols or numbers; anything that is not an element 1–118 raises.

    Raises:
        InvalidRecordError: naming the first unknown symbol (dummy ``X`` and Z = 0 are not elements).
    """
    numbers = np.empty(len(symbols), dtype=np.int64)
    for i, symbol in enumerate(symbols):
        if isinstance(symbol, (int, np.integer)) and not isinstance(symbol, bool):
            z = int(symbol)
        elif isinstance(symbol, float) and symbol.is_integer():
            z = int(symbol)
        else:
            z = atomic_numbers.get(str(symbol), 0)
        if not 1 <= z < len(chemical_symbols):
            raise InvalidRecordError(
                f"{where(source, record, field)}: atom {i} is {symbol!r}, not a chemical element",
                source=source, record=record, field=field)
        numbers[i] = z
    return numbers


def catch_invalid(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or the :class:`InvalidRecordError` it raised (so a stream can skip that record)."""
    try:
        return fn(*args, **kwargs)
    except InvalidRecordError as err:
        return err


class SkipReport:
    """Counts, logs and lists the records of one input that were skipped as invalid (``skip_invalid=True``).

    Use as a context manager around a read; :meth:`handle` either re-raises the error (``skip_invalid=False``)
    or records it. The report is a tab-separated file with the columns ``source``, ``record``, ``field`` and
    ``error``, written as records are skipped and closed with a ``# skipped K of N records`` line (also when
    K is 0, so an old report never stands for a new read). Nothing is dropped silently: every skip is logged.

    Args:
        source: name of the input (file or folder), for the log.
        skip_invalid: skip invalid records instead of raising.
        report: path of the report file; None writes ``skipped_<source>.tsv`` in the working directory.
    """

    def __init__(self, source: str, *, skip_invalid: bool = False, report: str | os.PathLike | None = None
                 ) -> None:
        self.source = source
        self.skip_invalid = bool(skip_invalid)
        self.path = Path(report) if report is not None else Path.cwd() / f"skipped_{Path(source).name}.tsv"
        self.skipped: list[tuple[str, str, str, str]] = []
        self.n_records = 0
        self._file = None
        self._writer = None
        self._closed = False

    def __enter__(self) -> SkipReport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ok(self) -> None:
        """Count one record that was read without error."""
        self.n_records += 1

    def records(self, items: Iterable[Any], limit: int | None = None) -> Iterator[Any]:
        """The items that are not :class:`InvalidRecordError` (those go to :meth:`handle`), at most ``limit``.

        ``items`` is closed when this stops early (limit, error, or the consumer closing it), so the files and LMDB
        environments it holds are released at once.
        """
        n = 0
        try:
            for item in items:
                if isinstance(item, InvalidRecordError):
                    self.handle(item)
                    continue
                self.ok()
                n += 1
                yield item
                if limit is not None and n >= limit:
                    return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def handle(self, error: ValueError, source: str | None = None, record: int | str | None = None) -> None:
        """Re-raise ``error`` unless skipping is on; otherwise count it, log it and add it to the report."""
        if not self.skip_invalid:
            raise error
        self.n_records += 1
        src = getattr(error, "source", None) or source or self.source
        rec = getattr(error, "record", None)
        rec = record if rec is None else rec
        row = (str(src), "" if rec is None else str(rec), str(getattr(error, "field", None) or ""),
               " ".join(str(error).split()))
        self.skipped.append(row)
        self._open()
        self._writer.writerow(row)
        self._file.flush()
        log.warning("skipping invalid record: %s", row[3])

    def _open(self) -> None:
        if self._file is None and not self._closed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", newline="")  # noqa: SIM115 - closed in close()
            self._writer = csv.writer(self._file, delimiter="\t", lineterminator="\n")
            self._writer.writerow(("source", "record", "field", "error"))

    def close(self) -> None:
        """Finish the report (also when nothing was skipped) and log the count; idempotent."""
        if not self.skip_invalid or self._closed:
            return
        self._open()
        self._file.write(f"# skipped {len(self.skipped)} of {self.n_records} records\n")
        self._file.close()
        self._file, self._closed = None, True
        if self.skipped:
            log.warning("%s: skipped %d of %d records as invalid; they are listed in %s",
                        self.source, len(self.skipped), self.n_records, self.path)


def check_lmdb_complete(env, file: str | os.PathLike, *, source: str) -> None:
    """Raise :class:`PotentialsInputError` if the LMDB data ``file`` of the open ``env`` is shorter than its pages.

    LMDB maps the file into memory: reading a page past the end of a truncated file (an interrupted copy or
    download) kills the process with SIGBUS instead of raising. The meta page records the last page in use, so the
    needed length is known before any record is read.
    """
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    size = os.path.getsize(file)
    if size < needed:
        raise PotentialsInputError(
            f"{where(source)}: the LMDB file is truncated ({size} bytes, its pages need {needed}); "
            "copy or download it again")


def open_lmdb_file(path: Path) -> Any:
    """Open the single-file LMDB environment ``path`` read-only (no lock file), checked for truncation.

    Raises:
        PotentialsInputError: the file is not an LMDB environment, or it is truncated.
    """
    import lmdb

    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as exc:
        raise PotentialsInputError(f"{where(path.name)}: cannot be opened as an LMDB file ({exc})") from None
    try:
        check_lmdb_complete(env, path, source=path.name)
    except PotentialsInputError:
        env.close()
        raise
    return env
