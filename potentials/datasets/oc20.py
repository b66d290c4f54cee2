"""OC20 (Chanussot et al. 2021) in its distributed formats, streamed as labelled ``ase.Atoms``.

Formats, told apart by file name (a path is one file or a folder of files of one kind, read in natural order):

* **S2EF pairs** ``<n>.extxyz`` + ``<n>.txt`` (either may end in ``.xz``): extended XYZ frames with
  ``Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3 energy=… free_energy=… pbc="T T T"``
  (raw DFT energy, eV; forces eV/Å) and, line by line in the same order, ``random<sid>,frame<fid>,<reference>``.
  By default the energy label is referenced, ``energy − reference`` (the adsorption-referenced energy OC20
  trains on); ``referenced=False`` keeps the raw DFT energy.
* **Relaxation trajectories** ``random<sid>.traj`` or ``random<sid>.extxyz[.xz]`` (IS2RS/IS2RE): every frame
  (``task="s2ef"``) or one record per system (``task="is2re"``). Their energies are raw DFT energies; referencing
  needs ``references`` (a file of ``random<sid>,<reference>`` lines, like OC20's ``system.txt``, or a dict).
* **LMDB** ``*.lmdb`` of pickled PyG ``Data`` (S2EF: ``y``, ``force``; IS2RE: ``y_init``, ``y_relaxed``,
  ``pos_relaxed``): labels are taken as stored. Unpickling runs code: only with ``trusted=True``.
* **ASE-LMDB** ``*.aselmdb`` (fairchem v2): calculator ``energy``/``forces`` as stored, minus a ``ref_energy``
  key-value pair or data entry when the row has one and ``referenced`` is True.

``task="s2ef"`` records: one structure per frame, energy (eV) and forces (eV/Å). ``task="is2re"`` records: the
initial structure with the relaxed energy as its ``energy`` label (no forces), ``info["y_init"]``,
``info["y_relaxed"]`` (eV) and ``arrays["pos_relaxed"]`` [N, 3] (Å, the IS2RS target). ``task="auto"`` takes
S2EF for pairs, trajectories and ASE-LMDB and follows the records of a pickled LMDB.

Every record keeps OC20's ``tags`` (0 subsurface, 1 surface, 2 adsorbate; ``atoms.arrays["tags"]``) and its
fixed atoms (a ``FixAtoms`` constraint): :class:`~potentials.graph.AtomicGraph` turns them into ``tags`` and
``fixed``. ``atoms.info`` holds ``source`` (file), ``frame`` (position in the file, or row id), ``sid`` and
``fid`` where known, ``task`` and ``ref_energy`` when an energy was referenced. Forces are as stored: fixed atoms
keep their DFT forces (``training.loss.free_atoms_only`` leaves them out of loss and metrics).
"""

from __future__ import annotations

import io
import lzma
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any, TextIO

import ase.io
import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms
from tqdm.auto import tqdm

from potentials.datasets import aselmdb, pyg_lmdb
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

TASKS = ("auto", "s2ef", "is2re", "is2rs")
_SID = re.compile(r"random(\d+)")


def read(
    path: str | os.PathLike,
    *,
    task: str = "auto",
    referenced: bool = True,
    references: str | os.PathLike | Mapping | None = None,
    trusted: bool = False,
    skip_invalid: bool = False,
    report: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> Iterator[Atoms]:
    """Stream OC20 records from a file or a folder (formats and labels: see the module docstring).

    Args:
        path: an S2EF ``.extxyz[.xz]`` or ``.txt[.xz]`` of a pair, a trajectory (``.traj``, an ``.extxyz`` with no
            ``.txt``), an ``.lmdb``, an ``.aselmdb``, or a folder of one of these kinds.
        task: ``"s2ef"`` (energy and forces per frame), ``"is2re"`` (initial structure → relaxed energy; ``"is2rs"``
            is the same record, whose ``pos_relaxed`` is the target), or ``"auto"``.
        referenced: subtract each system's reference energy (S2EF pairs; trajectories with ``references``;
            ASE-LMDB rows with ``ref_energy``); False keeps raw DFT energies.
        references: reference energies of trajectories: a file of ``random<sid>,<eV>`` lines or ``{sid: eV}``.
        trusted: allow unpickling ``.lmdb`` records (they can run code; only for files you trust).
        skip_invalid: skip malformed records (missing labels, NaN/inf, mismatched lengths, zero-volume cells,
            unknown elements) instead of raising; they are counted, logged and listed in ``report``.
        report: file listing skipped records (default ``skipped_<name>.tsv`` in the working directory).
        limit: stop after this many structures.
        progress: show a progress bar.

    Raises:
        FileNotFoundError: ``path`` does not exist, or an S2EF ``.extxyz`` has no ``.txt``.
        ValueError: unknown task or file kind; a trajectory needs a reference that is missing; the files of a pair
            disagree in length; a record is malformed and ``skip_invalid`` is False (file, record and field named).
        pyg_lmdb.UntrustedPickleError: an ``.lmdb`` without ``trusted=True``.
    """
    path = Path(path)
    if task not in TASKS:
        raise ValueError(f"{where(path.name)}: task must be one of {TASKS}, got {task!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"{where(path.name)}: limit must be a positive number of structures or None, got {limit}")
    if not path.exists():
        raise FileNotFoundError(f"OC20 path not found: {path}")
    kind, files = _inventory(path)
    if kind == "lmdb" and not trusted:
        pyg_lmdb.check_trusted(files[0], trusted)  # refuses before anything is read
    refs = _load_references(references) if references is not None else None
    if kind == "traj" and referenced and refs is None:
        raise ValueError(f"{where(path.name)}: trajectories hold raw DFT energies and no reference energy was "
                         "given; pass references=<file of random<sid>,<eV> lines> or referenced=False")
    options = dict(task="is2re" if task == "is2rs" else task, referenced=referenced, refs=refs, trusted=trusted)
    return _stream(path, kind, files, options, SkipReport(path.name, skip_invalid=skip_invalid, report=report),
                   limit, progress)


def _stream(path: Path, kind: str, files: list[Path], options: dict, skip: SkipReport, limit: int | None,
            progress: bool) -> Iterator[Atoms]:
    reader = {"s2ef": _read_pair, "traj": _read_trajectory, "lmdb": _read_lmdb, "aselmdb": _read_aselmdb}[kind]
    items = _each_file(files, reader, options)
    with skip, tqdm(unit="structure", desc=path.name, disable=not progress, leave=False) as bar:
        for atoms in skip.records(items, limit):
            bar.update(1)
            yield atoms


def _each_file(files: list[Path], reader, options: dict) -> Iterator[Atoms | InvalidRecordError]:
    for file in files:
        with closing(reader(file, **options)) as records:
            yield from records


# ------------------------------------------------------------------------------------------------ files


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _stem(p: Path) -> str:
    name = p.name[:-3] if p.name.endswith(".xz") else p.name
    return name.rsplit(".", 1)[0]


def _kind(p: Path) -> str | None:
    name = p.name[:-3] if p.name.endswith(".xz") else p.name
    for suffix, kind in ((".aselmdb", "aselmdb"), (".lmdb", "lmdb"), (".traj", "traj"), (".extxyz", "xyz"),
                         (".xyz", "xyz"), (".txt", "txt")):
        if name.endswith(suffix):
            return kind
    return None


def _txt_of(xyz: Path) -> Path | None:
    for name in (f"{_stem(xyz)}.txt", f"{_stem(xyz)}.txt.xz"):
        if (xyz.parent / name).is_file():
            return xyz.parent / name
    return None


def _inventory(path: Path) -> tuple[str, list[Path]]:
    """The kind of data (``s2ef``, ``traj``, ``lmdb``, ``aselmdb``) and its files in reading order.

    In a folder, an ``.extxyz`` with a ``.txt`` of the same stem is an S2EF pair and one without is a trajectory;
    other ``.txt`` files (e.g. ``system.txt`` of reference energies) are left alone unless pairs are present, and
    files of no OC20 kind are ignored. A folder mixing kinds is an error.
    """
    if not path.is_dir():
        kind = _kind(path)
        if kind is None:
            raise ValueError(f"{where(path.name)}: not an OC20 file kind (.extxyz[.xz], .txt[.xz], .traj, .lmdb, "
                             ".aselmdb)")
        if kind == "txt":
            xyz = [path.parent / f"{_stem(path)}{s}" for s in (".extxyz", ".extxyz.xz")]
            xyz = [p for p in xyz if p.is_file()]
            if not xyz:
                raise FileNotFoundError(f"{where(path.name)}: no {_stem(path)}.extxyz[.xz] beside it to pair with")
            return "s2ef", xyz[:1]
        if kind == "xyz":
            return ("s2ef" if _txt_of(path) is not None else "traj"), [path]
        return kind, [path]
    entries = sorted((p for p in path.iterdir() if p.is_file()), key=_natural)
    groups: dict[str, list[Path]] = {}
    for p in entries:
        kind = _kind(p)
        if kind == "xyz":
            kind = "s2ef" if _txt_of(p) is not None else "traj"
        if kind is not None:
            groups.setdefault(kind, []).append(p)
    texts = groups.pop("txt", [])
    if "s2ef" in groups:
        paired = {_stem(p) for p in groups["s2ef"]}
        lone = [p.name for p in texts if _stem(p) not in paired]
        if lone:
            raise FileNotFoundError(f"{where(path.name)}: .txt files without their S2EF frames (.extxyz): {lone[:5]}")
    if len(groups) > 1:
        listing = {kind: [p.name for p in files[:3]] for kind, files in groups.items()}
        raise ValueError(f"{where(path.name)}: the folder mixes kinds of OC20 files {listing} (an .extxyz without "
                         "its .txt counts as a trajectory); keep one kind per folder")
    if not groups:
        raise ValueError(f"{where(path.name)}: no OC20 files in this folder")
    ((kind, files),) = groups.items()
    return kind, files


def _open_text(path: Path) -> TextIO:
    return lzma.open(path, "rt") if path.name.endswith(".xz") else open(path)


def _xyz_frames(fh: TextIO, source: str) -> Iterator[tuple[int, str | InvalidRecordError]]:
    """``(index, text of one extxyz frame)``; a frame cut short at the end of the file yields an error."""
    index = 0
    for line in fh:
        if not line.strip():
            continue
        try:
            n = int(line)
        except ValueError:
            raise ValueError(f"{where(source, index)}: expected the atom count of the frame, found {line[:60]!r}; "
                             "the file is not extended XYZ or a previous frame has the wrong atom count") from None
        lines = [line]
        for _ in range(n + 1):
            row = fh.readline()
            if not row:
                yield index, InvalidRecordError(
                    f"{where(source, index, 'extxyz')}: the file ends inside this frame ({len(lines) - 2} of {n} "
                    "atom lines)", source=source, record=index, field="extxyz")
                return
            lines.append(row)
        yield index, "".join(lines)
        index += 1


def _parse_frame(text: str, source: str, index: int) -> Atoms:
    try:
        return ase.io.read(io.StringIO(text), format="extxyz")
    except KeyError as exc:  # ASE's symbol lookup
        raise InvalidRecordError(f"{where(source, index, 'species')}: unknown element {exc.args[0]!r}",
                                 source=source, record=index, field="species") from None
    except Exception as exc:  # ASE raises many types for malformed frames (bad columns, header)
        raise InvalidRecordError(f"{where(source, index, 'extxyz')}: cannot be parsed ({type(exc).__name__}: "
                                 f"{exc})", source=source, record=index, field="extxyz") from None


# ------------------------------------------------------------------------------------------------ readers


def _read_pair(xyz: Path, *, task: str, referenced: bool, **_: Any) -> Iterator[Atoms | InvalidRecordError]:
    if task == "is2re":
        raise ValueError(f"{where(xyz.name)}: S2EF frames carry no relaxed energies; use task='s2ef'")
    txt = _txt_of(xyz)
    with _open_text(xyz) as fx, _open_text(txt) as ft:
        lines = (line for line in ft if line.strip())
        for index, text in _xyz_frames(fx, xyz.name):
            line = next(lines, None)
            if line is None:
                raise ValueError(f"{where(txt.name)}: has {index} lines but {xyz.name} has more frames; "
                                 "the two files of a pair must match line for frame")
            try:
                if isinstance(text, InvalidRecordError):
                    raise text
                sid, fid, ref = _parse_txt_line(line, txt.name, index)
                atoms = _parse_frame(text, xyz.name, index)
                yield _from_atoms(atoms, xyz.name, index, task="s2ef", ids={"sid": sid, "fid": fid},
                                  ref=ref if referenced else None)
            except InvalidRecordError as err:
                yield err
        if next(lines, None) is not None:
            raise ValueError(f"{where(txt.name)}: has more lines than {xyz.name} has frames; the two files of a "
                             "pair must match line for frame")


def _parse_txt_line(line: str, source: str, index: int) -> tuple[int, int, float]:
    parts = line.strip().split(",")
    try:
        if len(parts) < 3 or not parts[0].startswith("random") or not parts[1].startswith("frame"):
            raise ValueError("expected random<sid>,frame<fid>,<reference energy>")
        ref = float(parts[2])
        if not np.isfinite(ref):
            raise ValueError("the reference energy is not finite")
        return int(parts[0][6:]), int(parts[1][5:]), ref
    except ValueError as exc:
        raise InvalidRecordError(f"{where(source, index, 'txt')}: line {line.strip()[:80]!r}: {exc}",
                                 source=source, record=index, field="txt") from None


def _read_trajectory(path: Path, *, task: str, referenced: bool, refs: dict | None, **_: Any
                     ) -> Iterator[Atoms | InvalidRecordError]:
    match = _SID.search(path.name)
    sid = int(match.group(1)) if match else None
    ref = None
    if referenced:
        if sid not in refs:
            yield InvalidRecordError(f"{where(path.name, None, 'references')}: no reference energy for system "
                                     f"{sid}", source=path.name, field="references")
            return
        ref = refs[sid]
    ids = {"sid": sid} if sid is not None else {}
    frames = _trajectory_frames(path)
    if task != "is2re":
        for index, atoms in frames:
            yield atoms if isinstance(atoms, InvalidRecordError) else catch_invalid(
                _from_atoms, atoms, path.name, index, task="s2ef", ids={**ids, "fid": index}, ref=ref)
        return
    first = last = None
    for index, atoms in frames:
        if isinstance(atoms, InvalidRecordError):
            yield atoms
            return
        first, last = (first or (index, atoms)), (index, atoms)
    if first is None:
        yield InvalidRecordError(f"{where(path.name)}: empty trajectory", source=path.name, field="frames")
        return
    yield catch_invalid(_is2re_from_frames, first, last, path.name, ids, ref)


def _trajectory_frames(path: Path) -> Iterator[tuple[int, Atoms | InvalidRecordError]]:
    if _kind(path) == "traj":
        yield from enumerate(ase.io.iread(path, index=":", format="traj"))
        return
    with _open_text(path) as fh:
        for index, text in _xyz_frames(fh, path.name):
            if isinstance(text, InvalidRecordError):
                yield index, text
            else:
                yield index, catch_invalid(_parse_frame, text, path.name, index)


def _is2re_from_frames(first: tuple[int, Atoms], last: tuple[int, Atoms], source: str, ids: dict,
                       ref: float | None) -> Atoms:
    """The IS2RE record of one trajectory: its first structure labelled with the last frame's energy."""
    (i_init, initial), (i_relaxed, relaxed) = first, last
    e_init = float(_result(initial, "energy", source, i_init))
    e_relaxed = float(_result(relaxed, "energy", source, i_relaxed))
    if len(relaxed) != len(initial) or np.any(relaxed.numbers != initial.numbers):
        raise InvalidRecordError(f"{where(source, None, 'numbers')}: the last frame has other atoms than the first",
                                 source=source, field="numbers")
    shift = ref or 0.0
    return _from_atoms(initial, source, 0, task="is2re", ids=ids, ref=ref, energy=e_relaxed - shift, forces=None,
                       extra_info={"y_init": e_init - shift, "y_relaxed": e_relaxed - shift},
                       arrays={"pos_relaxed": relaxed.positions})


def _read_lmdb(path: Path, *, task: str, trusted: bool, **_: Any) -> Iterator[Atoms | InvalidRecordError]:
    for index, fields in pyg_lmdb.iter_records(path, trusted=trusted):
        yield fields if isinstance(fields, InvalidRecordError) else catch_invalid(_from_fields, fields, path.name,
                                                                                    index, task)


def _from_fields(f: dict[str, Any], source: str, index: int, task: str) -> Atoms:
    """One unpickled OC20 LMDB record (field names of the PyG ``Data``) → Atoms."""
    def need(*names: str) -> Any:
        for name in names:
            if name in f:
                return f[name]
        raise InvalidRecordError(f"{where(source, index, names[0])}: missing (the record has {sorted(f)})",
                                 source=source, record=index, field=names[0])

    positions = np.asarray(need("pos"), dtype=float)
    numbers = np.asarray(need("atomic_numbers"))
    n = len(numbers)
    if "natoms" in f and int(np.asarray(f["natoms"]).reshape(-1)[0]) != n:
        raise InvalidRecordError(f"{where(source, index, 'natoms')}: {f['natoms']} but {n} atomic_numbers",
                                 source=source, record=index, field="natoms")
    ids = {k: _scalar_id(f[k]) for k in ("sid", "fid") if k in f}
    is2re = "y_relaxed" in f
    if task == "s2ef" and is2re or task == "is2re" and not is2re:
        want = "IS2RE labels (y_relaxed)" if task == "is2re" else "S2EF labels (y, force)"
        raise InvalidRecordError(f"{where(source, index, 'y_relaxed')}: task={task!r} needs {want}; "
                                 f"the record has {sorted(f)}", source=source, record=index, field="y_relaxed")
    common = dict(numbers=numbers, positions=positions, cell=np.reshape(need("cell"), (-1,))[-9:].reshape(3, 3),
                  pbc=np.ones(3, bool), tags=f.get("tags"), fixed=f.get("fixed"), ids=ids)
    if is2re:
        y_init, y_relaxed = (float(np.asarray(need(k)).reshape(-1)[0]) for k in ("y_init", "y_relaxed"))
        arrays = {"pos_relaxed": np.asarray(f["pos_relaxed"], float)} if "pos_relaxed" in f else {}
        return _assemble(source, index, task="is2re", energy=y_relaxed, forces=None, arrays=arrays,
                         info={"y_init": y_init, "y_relaxed": y_relaxed}, **common)
    energy = float(np.asarray(need("y", "energy")).reshape(-1)[0])
    return _assemble(source, index, task="s2ef", energy=energy, forces=need("force", "forces"), **common)


def _read_aselmdb(path: Path, *, task: str, referenced: bool, **_: Any) -> Iterator[Atoms | InvalidRecordError]:
    if task == "is2re":
        raise ValueError(f"{where(path.name)}: ASE-LMDB rows are read as S2EF frames; use task='s2ef'")
    for row_id, row in aselmdb.iter_rows(path):
        if isinstance(row, InvalidRecordError):
            yield row
            continue
        try:
            atoms = aselmdb.row_to_atoms(row)
        except Exception as exc:
            yield InvalidRecordError(f"{where(path.name, row_id, 'row')}: not an ASE row ({exc})", source=path.name,
                                     record=row_id, field="row")
            continue
        meta = {**atoms.info.pop("data", {}), **{k: v for k, v in atoms.info.items()}}
        ids = {k: _scalar_id(meta[k]) for k in ("sid", "fid") if k in meta}
        ref = meta.get("ref_energy") if referenced else None
        yield catch_invalid(_from_atoms, atoms, path.name, row_id, task="s2ef", ids=ids,
                     ref=None if ref is None else float(ref))


# ------------------------------------------------------------------------------------------------ assembly


def _result(atoms: Atoms, key: str, source: str, index: int) -> Any:
    value = (atoms.calc.results if atoms.calc is not None else {}).get(key)
    if value is None:
        raise InvalidRecordError(f"{where(source, index, key)}: missing (no {key} in the frame)", source=source,
                                 record=index, field=key)
    return value


def _from_atoms(atoms: Atoms, source: str, index: int, *, task: str, ids: dict, ref: float | None,
                energy: float | None = None, forces: Any = "calc", extra_info: dict | None = None,
                arrays: dict | None = None) -> Atoms:
    """Atoms parsed from extxyz/traj/ASE-LMDB → the OC20 record (labels from the calculator unless given)."""
    if energy is None:
        energy = float(_result(atoms, "energy", source, index))
        energy = energy - ref if ref is not None else energy
    if isinstance(forces, str):
        forces = _result(atoms, "forces", source, index)
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
    info = dict(extra_info or {})
    if ref is not None:
        info["ref_energy"] = ref
    return _assemble(source, index, task=task, numbers=atoms.numbers, positions=atoms.positions,
                     cell=atoms.cell.array, pbc=atoms.pbc, tags=atoms.arrays.get("tags"), fixed=fixed, ids=ids,
                     energy=energy, forces=forces, info=info, arrays=arrays)


def _assemble(source: str, index: int, *, task: str, numbers: Any, positions: Any, cell: Any, pbc: Any,
              tags: Any, fixed: Any, ids: dict, energy: float, forces: Any, info: dict | None = None,
              arrays: dict | None = None) -> Atoms:
    """Check one record and build its Atoms (tags, FixAtoms, labels, ids)."""
    numbers = atomic_numbers_of(np.asarray(numbers).tolist(), source=source, record=index, field="atomic_numbers")
    n = len(numbers)
    positions = np.asarray(positions, dtype=float)
    check_shape(positions, (n, 3), source=source, field="pos", record=index)
    check_finite(positions.reshape(1, -1), source=source, field="pos", frame_ids=[index])
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    cell = check_cell(cell, pbc, source=source, record=index)
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    for name, values, dtype in (("tags", tags, np.int64), ("fixed", fixed, bool)):
        if values is not None:
            values = np.asarray(values).reshape(-1)
            check_shape(values, (n,), source=source, field=name, record=index)
            if name == "tags":
                atoms.set_tags(values.astype(dtype))
            elif values.astype(dtype).any():
                atoms.set_constraint(FixAtoms(mask=values.astype(dtype)))
    for name, values in (arrays or {}).items():
        values = np.asarray(values, dtype=float)
        check_shape(values, (n, 3), source=source, field=name, record=index)
        check_finite(values.reshape(1, -1), source=source, field=name, frame_ids=[index])
        atoms.arrays[name] = values
    for name, value in (info or {}).items():
        check_finite(np.reshape(float(value), (1, 1)), source=source, field=name, frame_ids=[index])
    attach_labels(atoms, source=source, record=index, energy=energy,
                  forces=None if forces is None else np.asarray(forces, dtype=float))
    atoms.info.update(source=source, frame=index, task=task, **ids, **(info or {}))
    return atoms


def _scalar_id(value: Any) -> int | str:
    value = np.asarray(value).reshape(-1)[0].item() if np.ndim(value) else value
    if isinstance(value, str):
        match = re.fullmatch(r"(?:random|frame)?(\d+)", value)
        return int(match.group(1)) if match else value
    return int(value)


def _load_references(references: str | os.PathLike | Mapping) -> dict[int, float]:
    """``{sid: reference energy (eV)}`` from a mapping or a file of ``random<sid>,<eV>`` lines."""
    if isinstance(references, Mapping):
        return {int(_scalar_id(k)): float(v) for k, v in references.items()}
    path = Path(references)
    refs = {}
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.strip().split(",")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                refs[int(_scalar_id(parts[0]))] = float(parts[-1])
            except (ValueError, IndexError):
                raise ValueError(f"{path.name}:{lineno}: expected random<sid>,<reference energy eV>, found "
                                 f"{line.strip()[:80]!r}") from None
    return refs
