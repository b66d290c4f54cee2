"""MPtrj (Deng et al. 2023, the CHGNet training set) as a stream of labelled ``ase.Atoms``.

Two storage formats give the same Atoms, labels and ids for the same frame:

* the original JSON (``MPtrj_2022.9_full.json``, also ``.json.gz``/``.bz2``/``.xz``), laid out as
  ``{mp_id: {"<task_id>-<calc_id>-<ionic_step>": frame}}``; each frame holds ``structure`` (a pymatgen
  ``Structure.as_dict()``), ``uncorrected_total_energy`` and ``corrected_total_energy`` (eV),
  ``energy_per_atom``, ``ef_per_atom``, ``e_per_atom_relaxed``, ``ef_per_atom_relaxed`` (eV/atom), ``force``
  [N][3] (eV/Å), ``stress`` [3][3] (kBar, VASP sign: positive under compression), ``magmom`` [N] (μB or null),
  ``bandgap`` (eV or null) and ``mp_id``. The file (about 11 GB) is parsed incrementally with ijson, one
  frame at a time, so memory stays flat whatever the file size; a progress bar counts the bytes read.
* an ASE database (``.db``) with one row per frame: positions, cell and a calculator holding ``energy``
  (= ``uncorrected_total_energy``), ``forces`` (eV/Å), ``stress`` (Voigt, eV/Å³, ASE sign) and ``magmoms``;
  ``row.data`` (or the key-value pairs) holds ``mp_id``, ``uid`` (the frame id), ``task_id``, ``calc_id``,
  ``ionic_step``, ``corrected_total_energy`` and the per-atom energies.

Units are converted here, once: stress σ_ASE [eV/Å³] = −0.1 GPa/kBar · stress_kBar (ASE's sign,
σ = (1/V)·∂E/∂ε, is the opposite of VASP's). Each Atoms carries ``atoms.info``: ``source`` (file name),
``frame`` (the MPtrj frame id), ``mp_id``, ``task_id``, ``calc_id``, ``ionic_step``, ``energy_key`` and the
frame's scalar labels (the two total energies, the four per-atom energies, ``bandgap`` when known), and
``atoms.arrays["magmoms"]`` [N] (μB) when the frame has magnetic moments. Split by ``mp_id``
(``split.group_by=mp_id``) so that no material is in two splits.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ijson
import numpy as np
from ase import Atoms, units
from tqdm.auto import tqdm

from potentials.datasets.validate import (
    InvalidRecordError,
    SkipReport,
    atomic_numbers_of,
    attach_labels,
    catch_invalid,
    check_cell,
    check_finite,
    check_shape,
    where,
)

#: Energy labels a frame can be trained on (both total energies, eV).
ENERGY_KEYS = ("corrected_total_energy", "uncorrected_total_energy")
#: Keys every JSON frame must have (besides the chosen energy key).
REQUIRED_KEYS = ("structure", "force", "stress")
#: Scalar labels copied to ``atoms.info`` when present (eV or eV/atom; bandgap eV).
INFO_KEYS = ("uncorrected_total_energy", "corrected_total_energy", "energy_per_atom", "ef_per_atom",
             "e_per_atom_relaxed", "ef_per_atom_relaxed", "bandgap")
#: eV/Å³ (ASE sign) per kBar of VASP-sign stress: σ_ASE = −0.1 GPa/kBar · stress_kBar.
KBAR_TO_EV_PER_A3 = -0.1 * units.GPa
_OPENERS = {".gz": gzip.GzipFile, ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}
_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def read(
    path: str | os.PathLike,
    *,
    energy_key: str = "corrected_total_energy",
    skip_invalid: bool = False,
    report: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> Iterator[Atoms]:
    """Stream MPtrj frames from the original JSON or from an ASE database.

    Args:
        path: ``.json`` (optionally ``.gz``/``.bz2``/``.xz``) in MPtrj's layout, or an ASE database ``.db``.
        energy_key: ``"corrected_total_energy"`` (MP2020-corrected, the default) or
            ``"uncorrected_total_energy"`` (raw VASP); becomes the ``energy`` label, eV.
        skip_invalid: skip malformed frames (missing keys, non-finite labels, mismatched lengths, zero-volume
            cells, unknown elements) instead of raising; they are counted, logged and listed in ``report``.
        report: where skipped frames are listed (tab-separated); default ``skipped_<file name>.tsv`` in the
            working directory. Written only with ``skip_invalid=True``.
        limit: stop after this many structures (None: all).
        progress: show a progress bar (bytes read for JSON, rows for a database).

    Yields:
        ``ase.Atoms`` (periodic) with a ``SinglePointCalculator`` holding ``energy`` (eV), ``forces`` [N, 3]
        (eV/Å) and ``stress`` (6 Voigt values, eV/Å³, ASE sign), ids and extra labels in ``atoms.info``,
        magnetic moments in ``atoms.arrays["magmoms"]``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``energy_key`` unknown; the file is not valid JSON (position and the last frame read are
            named); a frame is malformed and ``skip_invalid`` is False (file, frame id and field are named).
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"{where(path.name)}: limit must be a positive number of frames or None, got {limit}")
    if energy_key not in ENERGY_KEYS:
        raise ValueError(f"{where(path.name)}: energy_key must be one of {ENERGY_KEYS}, got {energy_key!r}")
    if not path.is_file():
        raise FileNotFoundError(f"MPtrj file not found: {path}")
    reader = _read_db if path.suffix.lower() in _DB_SUFFIXES else _read_json
    return reader(path, energy_key=energy_key, skip=SkipReport(path.name, skip_invalid=skip_invalid, report=report),
                  limit=limit, progress=progress)


# --------------------------------------------------------------------------------------------- JSON


def _read_json(path: Path, *, energy_key: str, skip: SkipReport, limit: int | None, progress: bool
               ) -> Iterator[Atoms]:
    source = path.name
    with open(path, "rb") as raw, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=source,
                                       disable=not progress, leave=False) as bar, skip:
        counted = _CountingReader(raw, bar)
        opener = _OPENERS.get(path.suffix.lower())
        stream = opener(fileobj=counted) if opener else counted
        yield from skip.records((catch_invalid(frame_to_atoms, frame, mp_id=mp_id, frame_id=frame_id, source=source,
                                               energy_key=energy_key)
                                 for mp_id, frame_id, frame in iter_json_frames(stream, source)), limit)


def iter_json_frames(stream: BinaryIO, source: str) -> Iterator[tuple[str, str, Any]]:
    """``(mp_id, frame_id, frame)`` for every frame of an MPtrj JSON stream, one frame in memory at a time.

    Bare ``NaN``/``Infinity`` tokens (written by Python's ``json`` for non-finite floats) are read as numbers so
    that the frame holding them is reported by id and field rather than failing the whole parse.

    Raises:
        ValueError: the stream is not JSON of MPtrj's two-level layout (names the byte offset and the last frame).
    """
    events = ijson.basic_parse(_NonFiniteTokens(stream), use_float=True)
    last = "none yet"
    try:
        _expect(next(events, ("end of file", None)), "start_map", source, "the file must be a JSON object")
        for event, mp_id in events:
            if event == "end_map":
                return
            _expect(next(events), "start_map", source,
                    f"material {mp_id!r} must map frame ids to frames")
            for event, frame_id in events:
                if event == "end_map":
                    break
                last = f"{mp_id}/{frame_id}"
                yield mp_id, frame_id, _build(events)
        raise ValueError(f"{where(source)}: the JSON ends early (last frame read: {last})")
    except ijson.JSONError as exc:
        offset = getattr(stream, "tell", lambda: "?")()
        raise ValueError(f"{where(source)}: not valid JSON near byte {offset} (last frame read: {last}): "
                         f"{str(exc).strip().splitlines()[0]}") from None


def _expect(item: tuple[str, Any], event: str, source: str, what: str) -> None:
    if item[0] != event:
        raise ValueError(f"{where(source)}: not MPtrj's layout: {what} (found {item[0]} {item[1]!r:.60})")


def _build(events: Iterator[tuple[str, Any]]) -> Any:
    """Assemble the next JSON value from ijson's basic events (a small, fast stand-in for ObjectBuilder)."""
    stack: list[Any] = []
    keys: list[Any] = []
    current: Any = None
    key: Any = None
    root: Any = None
    for event, value in events:
        if event == "map_key":
            key = value
            continue
        if event == "start_map" or event == "start_array":
            new: Any = {} if event == "start_map" else []
            if current is None:
                root = new
            elif type(current) is dict:
                current[key] = new
            else:
                current.append(new)
            stack.append(current)
            keys.append(key)
            current = new
        elif event == "end_map" or event == "end_array":
            current = stack.pop()
            key = keys.pop()
            if current is None:
                return root
        elif current is None:
            return value
        elif type(current) is dict:
            current[key] = value
        else:
            current.append(value)
    raise ijson.IncompleteJSONError("incomplete JSON value at the end of the file")


class _CountingReader:
    """File wrapper that advances a progress bar by the bytes read."""

    def __init__(self, raw: BinaryIO, bar: tqdm) -> None:
        self.raw, self.bar = raw, bar

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.bar.update(len(data))
        return data

    def tell(self) -> int:
        return self.raw.tell()


class _NonFiniteTokens:
    """Rewrites bare ``NaN``, ``Infinity`` and ``-Infinity`` values as JSON strings (``"NaN"``); cheap when absent.

    Each read returns the data up to the last ``,``, ``]`` or ``}`` seen, so a token and the delimiters around
    it always arrive in one piece; the rest waits for the next read.
    """

    _TOKEN = re.compile(rb"([\[,:]\s*)(NaN|-?Infinity)(?=\s*[,\]}])")
    _MAX_HOLD = 1 << 20

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.tail, self.prev = stream, b"", b""

    def read(self, n: int = 65536) -> bytes:
        if n == 0:  # ijson probes the type of the stream with read(0)
            return b""
        while True:
            chunk = self.stream.read(max(n, 4096))
            data = self.tail + chunk
            cut = max(data.rfind(b","), data.rfind(b"]"), data.rfind(b"}")) + 1
            if not chunk or len(data) > self._MAX_HOLD:
                out, self.tail = data, b""
                break
            if cut > 0:
                out, self.tail = data[:cut], data[cut:]
                break
            self.tail = data
        if b"NaN" in out or b"Infinity" in out:
            out = self._TOKEN.sub(rb'\1"\2"', self.prev + out)[len(self.prev):]
        self.prev = out[-1:]
        return out

    def tell(self) -> int | str:
        return getattr(self.stream, "tell", lambda: "?")()


def frame_to_atoms(frame: Any, *, mp_id: str, frame_id: str, source: str,
                   energy_key: str = "corrected_total_energy") -> Atoms:
    """One MPtrj JSON frame → labelled ``ase.Atoms`` (units and ids as in the module docstring).

    Raises:
        InvalidRecordError: a required key is missing or null, an array has the wrong length, a value is not
            finite, the cell has no volume or a site is not one known element (naming file, frame and field).
    """
    def bad(field: str, message: str) -> InvalidRecordError:
        return InvalidRecordError(f"{where(source, frame_id, field)}: {message}", source=source, record=frame_id,
                                  field=field)

    if not isinstance(frame, dict):
        raise bad("frame", f"expected a JSON object, got {type(frame).__name__}")
    for key in (*REQUIRED_KEYS, energy_key):
        if key not in frame:
            raise bad(key, f"missing (the frame has {sorted(frame)})")
        if frame[key] is None and key != "stress":
            raise bad(key, "is null")
    if frame.get("mp_id") not in (None, mp_id):
        raise bad("mp_id", f"{frame['mp_id']!r} differs from the material key {mp_id!r} it is stored under")
    numbers, positions, cell, pbc, site_magmoms = _structure(frame["structure"], bad, source, frame_id)
    n = len(numbers)
    forces = _floats(frame["force"], "force", bad)
    check_shape(forces, (n, 3), source=source, field="force", record=frame_id)
    stress = None
    if frame["stress"] is not None:
        stress = _floats(frame["stress"], "stress", bad)
        check_shape(stress, (3, 3), source=source, field="stress", record=frame_id)
        stress = stress * KBAR_TO_EV_PER_A3
    magmoms = frame.get("magmom")
    magmoms = site_magmoms if magmoms is None else _floats(magmoms, "magmom", bad)
    labels = {key: _scalar(frame[key], key, bad) for key in INFO_KEYS if frame.get(key) is not None}
    task_id, calc_id, ionic_step = _split_frame_id(frame_id)
    ids = {"mp_id": mp_id, "task_id": task_id, "calc_id": calc_id, "ionic_step": ionic_step}
    return make_atoms(source=source, frame_id=frame_id, numbers=numbers, positions=positions, cell=cell, pbc=pbc,
                      forces=forces, stress=stress, magmoms=magmoms, labels=labels, ids=ids,
                      energy_key=energy_key)


def _structure(struct: Any, bad, source: str, frame_id: str) -> tuple:
    """numbers [N], positions [N, 3] Å, cell [3, 3] Å, pbc [3], site magmoms [N] or None from a pymatgen dict."""
    try:
        lattice = struct["lattice"]
        sites = struct["sites"]
        matrix = lattice["matrix"]
    except (KeyError, TypeError) as exc:
        raise bad("structure", f"not a pymatgen Structure dict (missing {exc})") from None
    pbc = np.asarray(lattice.get("pbc", (True, True, True)), dtype=bool)
    cell = check_cell(matrix, pbc, source=source, record=frame_id, field="structure.lattice.matrix")
    if not isinstance(sites, list) or not sites:
        raise bad("structure.sites", "no sites")
    symbols, positions, magmoms = [], [], []
    for i, site in enumerate(sites):
        try:
            species = site["species"]
            if len(species) != 1 or not math.isclose(float(species[0].get("occu", 1.0)), 1.0, abs_tol=1e-6):
                raise bad("structure.sites", f"site {i} is disordered ({species}); MPtrj sites hold one element")
            symbols.append(species[0]["element"])
            if "xyz" in site:
                positions.append(site["xyz"])
            else:
                positions.append(np.asarray(site["abc"], dtype=float) @ cell)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidRecordError):
                raise
            raise bad("structure.sites", f"site {i} is malformed ({type(exc).__name__}: {exc})") from None
        magmoms.append((site.get("properties") or {}).get("magmom"))
    numbers = atomic_numbers_of(symbols, source=source, record=frame_id, field="structure.sites.species")
    positions = _floats(positions, "structure.sites.xyz", bad)
    check_shape(positions, (len(sites), 3), source=source, field="structure.sites.xyz", record=frame_id)
    check_finite(positions.reshape(1, -1), source=source, field="structure.sites.xyz", frame_ids=[frame_id])
    site_magmoms = None if any(m is None for m in magmoms) else _floats(magmoms, "structure.sites.magmom", bad)
    return numbers, positions, cell, pbc, site_magmoms


def _floats(value: Any, field: str, bad) -> np.ndarray:
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise bad(field, f"not an array of numbers ({exc})") from None


def _scalar(value: Any, field: str, bad) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise bad(field, f"not a number: {value!r:.60}") from None


def _split_frame_id(frame_id: str) -> tuple[str, int | None, int | None]:
    """``"mp-1393488-0-5"`` → (``"mp-1393488"``, 0, 5); ids of another form give (frame_id, None, None)."""
    parts = str(frame_id).rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], int(parts[1]), int(parts[2])
    return str(frame_id), None, None


def make_atoms(*, source: str, frame_id: str, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray,
               pbc: np.ndarray, forces: np.ndarray, stress: np.ndarray | None, magmoms: np.ndarray | None,
               labels: dict[str, float], ids: dict[str, Any], energy_key: str) -> Atoms:
    """Assemble one frame (shared by the JSON and database readers so both give identical Atoms).

    Args:
        labels: scalar labels by MPtrj name (eV, eV/atom), among them ``energy_key``.
        ids: ``mp_id``, ``task_id``, ``calc_id``, ``ionic_step``.
        stress: [3, 3] eV/Å³ with ASE's sign, or None.
    """
    if energy_key not in labels:
        raise InvalidRecordError(f"{where(source, frame_id, energy_key)}: missing", source=source,
                                 record=frame_id, field=energy_key)
    for key, value in labels.items():
        check_finite(np.reshape(value, (1, 1)), source=source, field=key, frame_ids=[frame_id])
    check_finite(forces.reshape(1, -1), source=source, field="force", frame_ids=[frame_id])
    if stress is not None:
        check_finite(stress.reshape(1, -1), source=source, field="stress", frame_ids=[frame_id])
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    if magmoms is not None:
        check_shape(magmoms, (len(numbers),), source=source, field="magmom", record=frame_id)
        check_finite(magmoms.reshape(1, -1), source=source, field="magmom", frame_ids=[frame_id])
        atoms.arrays["magmoms"] = magmoms.astype(float)
    attach_labels(atoms, source=source, record=frame_id, energy=labels[energy_key], forces=forces, stress=stress)
    atoms.info.update(source=source, frame=str(frame_id), **{k: v for k, v in ids.items() if v is not None},
                      energy_key=energy_key, **labels)
    return atoms


# --------------------------------------------------------------------------------------------- ASE database


def _read_db(path: Path, *, energy_key: str, skip: SkipReport, limit: int | None, progress: bool
             ) -> Iterator[Atoms]:
    import ase.db

    source = path.name
    db = ase.db.connect(path, type="db")
    with skip, tqdm(db.select(), total=db.count(), unit="frame", desc=source, disable=not progress,
                    leave=False) as rows:
        yield from skip.records((catch_invalid(row_to_atoms, row, source=source, energy_key=energy_key)
                                 for row in rows), limit)


def row_to_atoms(row: Any, *, source: str, energy_key: str = "corrected_total_energy") -> Atoms:
    """One ASE database row holding an MPtrj frame → the same Atoms :func:`frame_to_atoms` gives for it.

    The row's calculator ``energy`` is MPtrj's ``uncorrected_total_energy``; ``stress`` is already eV/Å³ with
    ASE's sign; ids and the other energies are looked up in ``row.data``, then in the key-value pairs.
    """
    extra = {**dict(row.get("key_value_pairs", {}) or {}), **dict(row.data or {})}
    frame_id = str(extra.get("uid", extra.get("frame_id", f"row {row.id}")))

    def bad(field: str, message: str) -> InvalidRecordError:
        return InvalidRecordError(f"{where(source, frame_id, field)}: {message}", source=source, record=frame_id,
                                  field=field)

    if "mp_id" not in extra:
        raise bad("mp_id", "missing from row.data and the key-value pairs; not an MPtrj row")
    numbers = atomic_numbers_of(list(row.numbers), source=source, record=frame_id, field="numbers")
    pbc = np.asarray(row.pbc, dtype=bool)
    cell = check_cell(row.cell, pbc, source=source, record=frame_id)
    for key in ("energy", "forces"):
        if row.get(key) is None:
            raise bad(key, "missing from the row's calculator results")
    labels = {key: _scalar(extra[key], key, bad) for key in INFO_KEYS if extra.get(key) is not None}
    labels.setdefault("uncorrected_total_energy", _scalar(row.energy, "energy", bad))
    forces = np.asarray(row.forces, dtype=float)
    check_shape(forces, (len(numbers), 3), source=source, field="forces", record=frame_id)
    stress = row.get("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=float)
        stress = _voigt_to_3x3(stress) if stress.shape == (6,) else stress
    magmoms = row.get("magmoms")
    task_id, calc_id, ionic_step = _split_frame_id(frame_id)
    ids = {"mp_id": str(extra["mp_id"]), "task_id": str(extra.get("task_id", task_id)),
           "calc_id": _int_or_none(extra.get("calc_id", calc_id)),
           "ionic_step": _int_or_none(extra.get("ionic_step", ionic_step))}
    return make_atoms(source=source, frame_id=frame_id, numbers=numbers, positions=np.asarray(row.positions, float),
                      cell=cell, pbc=pbc, forces=forces, stress=stress,
                      magmoms=None if magmoms is None else np.asarray(magmoms, dtype=float), labels=labels, ids=ids,
                      energy_key=energy_key)


def _voigt_to_3x3(s: np.ndarray) -> np.ndarray:
    xx, yy, zz, yz, xz, xy = s
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
