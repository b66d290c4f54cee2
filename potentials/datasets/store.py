"""A disk-backed store of AtomicGraph records with random access, for datasets that do not fit in memory.

Build one with ``potentials preprocess`` (:mod:`potentials.datasets.preprocess`); train from it with
``data=store data.path=...`` (:class:`StoreDataset` inside the usual
:class:`~potentials.datasets.datamodule.AtomsDataModule`).

Layout of a store directory::

    manifest.json    what the store holds (record count, cutoff, dtype, sources with sha256, complete flag)
    data.mdb         LMDB environment: sub-databases "records", "info" and "meta"
    lock.mdb         LMDB reader table (used while writing)
    cache/           statistics and group codes computed on first use, keyed on split, cutoff and dtype

Why LMDB: one memory-mapped B-tree file gives random access by key with no per-record file and no index to load
(record ``i`` is the 8-byte big-endian key ``i``), so opening a store costs the same for 1,000 or 133 million
records and a process holds only the pages it touches (file-backed, shared between DataLoader workers and DDP
ranks through the page cache, and dropped by the kernel under pressure). Writes are transactions: a batch of
records and the conversion's progress commit together or not at all, which is what makes conversion resumable
after SIGKILL with every record stored exactly once. Sharded numpy files would need that bookkeeping written by
hand, and SQLite copies every read through its own page cache. LMDB handles must not cross a ``fork``, so
:class:`GraphStore` opens the environment lazily in each process (keyed on the process id), read-only and
without the lock file; every DataLoader worker and every DDP rank gets its own handle.

Record encoding (no pickle, so reading a store never runs code): a 16-byte header ``crc32 | n_atoms | n_edges |
flags | float size`` followed by raw little-endian arrays, widest first so that every array is aligned:
``energy`` [1] float64, ``pos`` [N,3], ``cell`` [3,3], ``forces`` [N,3] (if labelled), ``stress`` [3,3] (if labelled),
``edge_index`` [2,E] int32 and ``tags`` [N] int32, then ``cell_offsets`` [E,3] int8, ``z`` [N] uint8 and
``fixed`` [N] uint8. The total energy is always float64 (float32 would round a 5000 eV energy by 0.2 meV);
the other floats are stored in the store's dtype (float32 halves the size; float64 keeps positions exact for
float64 training). The crc32 covers everything after it, so a damaged record is reported, not
silently trained on. The "info" database holds each record's scalar ``atoms.info`` values as JSON (``source``,
``frame``, ``mp_id``, ...) plus ``index``, the record's position in the source stream; ``split.group_by`` reads
them without decoding graphs.

Edges are stored by default, at the cutoff given to ``preprocess``: training then does no neighbour search
(vesin costs about 0.15–0.5 ms per MPtrj/OC20 frame, several times what reading a record costs). They take
about 11 bytes each, roughly ten times the per-atom data at a 5–6 Å cutoff, so for OC20-scale sets ``--no-edges`` stores
positions and labels only and the graph is built when a record is read. A store with edges can be read at a
smaller cutoff than it was built with (edges are filtered), never at a larger one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from potentials.datasets.stats import DatasetStats, compute_stats
from potentials.errors import PotentialsInputError
from potentials.graph import AtomicGraph
from potentials.neighbors import neighbor_list

log = logging.getLogger(__name__)

FORMAT = "potentials-graph-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASES = (b"records", b"info", b"meta")
#: Virtual size of the memory map (the file only grows as data is written); the writer doubles it when full.
MAP_SIZE = 1 << 40

_HEADER = struct.Struct("<IIIHH")  # crc32, n_atoms, n_edges, flags, bytes per float
_ENERGY, _FORCES, _STRESS, _EDGES = 1, 2, 4, 8
_PBC_SHIFT = 4  # bits 4, 5, 6: periodic along a, b, c
_F8, _I4, _I1, _U1 = np.dtype("<f8"), np.dtype("<i4"), np.dtype("i1"), np.dtype("u1")
_FLOATS = {4: np.dtype("<f4"), 8: _F8}


class StoreError(PotentialsInputError):
    """A store that cannot be used as it is: missing, incomplete, corrupted or built for other settings."""


def record_key(index: int) -> bytes:
    """LMDB key of record ``index``: 8 bytes big-endian, so keys sort in record order."""
    return int(index).to_bytes(8, "big")


def rebuild_hint(manifest: dict | None, path: Path) -> str:
    """How to (re)build the store at ``path``, from the command recorded in its manifest when there is one."""
    command = (manifest or {}).get("command") or f"potentials preprocess DATA_CONFIG {path}"
    return f"`{command}`"


# ---------------------------------------------------------------------------------------------------- manifest


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(path: Path, manifest: dict) -> dict:
    """Write ``path/manifest.json`` atomically (temporary file, fsync, rename) with its own sha256 checksum."""
    manifest = {k: v for k, v in manifest.items() if k != "checksum"}
    manifest["checksum"] = manifest_checksum(manifest)
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / MANIFEST)
    return manifest


def read_manifest(path: str | os.PathLike, *, require_complete: bool = True) -> dict:
    """The manifest of the store at ``path``, checked.

    Raises:
        StoreError: no manifest (not a store), a manifest that does not parse or whose checksum does not match
            (corrupted), another format or version, or (with ``require_complete``) an unfinished conversion.
            Messages say which and give the command that rebuilds or finishes the store.
    """
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        what = "does not exist" if not path.exists() else f"has no {MANIFEST}, so it is not a graph store"
        raise StoreError(f"graph store '{path}' {what}; build it with `potentials preprocess DATA_CONFIG {path}`")
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"expected a JSON object, found {type(manifest).__name__}")
    except (ValueError, UnicodeDecodeError) as err:
        raise StoreError(
            f"graph store '{path}': {MANIFEST} is corrupted (it does not parse: {err}); delete the directory and "
            f"rebuild it with `potentials preprocess DATA_CONFIG {path}` (or add --overwrite)"
        ) from None
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise StoreError(
            f"graph store '{path}': {MANIFEST} is corrupted (its checksum does not match its content; was it edited "
            f"or damaged?); rebuild the store with {rebuild_hint(manifest, path)} plus --overwrite"
        )
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"graph store '{path}': format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"this package reads {FORMAT!r} version {FORMAT_VERSION}; rebuild it with "
            f"{rebuild_hint(manifest, path)} plus --overwrite"
        )
    if require_complete and not manifest.get("complete"):
        raise StoreError(
            f"graph store '{path}' is incomplete: its conversion was interrupted or is still running "
            f"({manifest.get('num_records', 0)} records when the manifest was last written). Rerun the same "
            f"command to finish it (conversion resumes where it stopped): {rebuild_hint(manifest, path)}"
        )
    return manifest


def open_environment(path: Path, *, write: bool, map_size: int = MAP_SIZE) -> lmdb.Environment:
    """The LMDB environment of a store; read-only handles take no lock (a complete store is never written)."""
    if write:
        return lmdb.open(str(path), map_size=map_size, max_dbs=len(DATABASES), subdir=True, readahead=False,
                         meminit=False)
    return lmdb.open(str(path), readonly=True, lock=False, max_dbs=len(DATABASES), subdir=True, readahead=False)


# ------------------------------------------------------------------------------------------------------ records


def encode_record(graph: AtomicGraph, float_bytes: int = 4, edges: bool = True) -> bytes:
    """One graph (from :meth:`AtomicGraph.from_atoms`) as record bytes; see the module docstring for the layout.

    Args:
        graph: a single structure.
        float_bytes: 4 (float32) or 8 (float64) for positions, cell and labels.
        edges: store ``edge_index`` and ``cell_offsets``.
    """
    f = _FLOATS[float_bytes]
    n = int(graph.pos.shape[0])
    pbc = graph.pbc.reshape(3).tolist()
    flags = sum(1 << (_PBC_SHIFT + k) for k in range(3) if pbc[k]) | (_EDGES if edges else 0)
    parts = [graph.energy.numpy().astype("<f8"), graph.pos.numpy().astype(f), graph.cell.numpy().astype(f)]
    for bit, name in ((_FORCES, "forces"), (_STRESS, "stress")):
        if bool(getattr(graph, f"has_{name}")):
            flags |= bit
            parts.append(getattr(graph, name).numpy().astype(f))
    flags |= _ENERGY if bool(graph.has_energy) else 0
    n_edges = int(graph.edge_index.shape[1]) if edges else 0
    offsets = graph.cell_offsets.numpy()
    if edges and offsets.size and np.abs(offsets).max() > 127:
        raise ValueError(f"cell offsets up to {int(np.abs(offsets).max())} do not fit the int8 encoding; "
                         "the cell is far smaller than the cutoff")
    if edges:
        parts.append(graph.edge_index.numpy().astype("<i4"))
    parts.append(graph.tags.numpy().astype("<i4"))
    if edges:
        parts.append(offsets.astype(np.int8))
    parts += [graph.z.numpy().astype(np.uint8), graph.fixed.numpy().astype(np.uint8)]
    body = _HEADER.pack(0, n, n_edges, flags, float_bytes)[4:] + b"".join(p.tobytes() for p in parts)
    return struct.pack("<I", zlib.crc32(body)) + body


def decode_record(buf: bytes | memoryview, where: str) -> dict[str, Any]:
    """Record bytes → numpy arrays (views into ``buf``) and label masks.

    Raises:
        StoreError: the checksum does not match or the record is truncated (``where`` names store and record).
    """
    if len(buf) < _HEADER.size:
        raise StoreError(f"{where}: truncated ({len(buf)} bytes)")
    crc, n, e, flags, fb = _HEADER.unpack_from(buf)
    if zlib.crc32(memoryview(buf)[4:]) != crc or fb not in _FLOATS:
        raise StoreError(f"{where}: checksum mismatch")
    f = _FLOATS[fb]
    offset = _HEADER.size
    out: dict[str, Any] = {}

    def take(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        nonlocal offset
        count = math.prod(shape)
        out[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize

    take("energy", _F8, (1,))
    take("pos", f, (n, 3))
    take("cell", f, (3, 3))
    if flags & _FORCES:
        take("forces", f, (n, 3))
    if flags & _STRESS:
        take("stress", f, (3, 3))
    if flags & _EDGES:
        take("edge_index", _I4, (2, e))
    take("tags", _I4, (n,))
    if flags & _EDGES:
        take("cell_offsets", _I1, (e, 3))
    take("z", _U1, (n,))
    take("fixed", _U1, (n,))
    if offset != len(buf):
        raise StoreError(f"{where}: length {len(buf)} bytes, its header says {offset}")
    out["pbc"] = np.array([bool(flags >> (_PBC_SHIFT + k) & 1) for k in range(3)])
    out["has_energy"] = bool(flags & _ENERGY)
    out["has_edges"] = bool(flags & _EDGES)
    return out


def _graph(**fields: torch.Tensor) -> AtomicGraph:
    """``AtomicGraph(**fields)`` without PyG's per-attribute ``__setattr__`` (70 µs → 5 µs per graph)."""
    graph = AtomicGraph()
    graph._store._mapping.update(fields)
    return graph


def graph_from_record(rec: dict[str, Any], cutoff: float, stored_cutoff: float | None,
                      dtype: torch.dtype) -> AtomicGraph:
    """An :class:`AtomicGraph` equal to ``AtomicGraph.from_atoms`` at ``cutoff`` (within the stored precision).

    Edges stored at ``stored_cutoff`` > ``cutoff`` are filtered; a record without edges gets them from vesin.
    """
    n = rec["pos"].shape[0]
    float_type = np.float64 if dtype == torch.float64 else np.float32
    if not rec["has_edges"]:
        edge_index, offsets = neighbor_list(rec["pos"], rec["cell"], rec["pbc"], cutoff)
    else:
        edge_index = rec["edge_index"].astype(np.int64)
        offsets = rec["cell_offsets"]
        if stored_cutoff is not None and cutoff < stored_cutoff:
            j, i = edge_index
            pos64 = rec["pos"].astype(np.float64)
            vec = pos64[j] + offsets @ rec["cell"].astype(np.float64) - pos64[i]
            keep = np.einsum("ij,ij->i", vec, vec) < cutoff * cutoff
            edge_index, offsets = edge_index[:, keep], offsets[keep]

    def floats(a: np.ndarray, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        a = np.array(a, dtype=float_type)
        return torch.from_numpy(a if shape is None else a.reshape(shape))

    has_forces, has_stress = "forces" in rec, "stress" in rec
    flags = torch.from_numpy(np.array([[rec["has_energy"]], [has_forces], [has_stress]]))
    return _graph(
        pos=floats(rec["pos"]),
        z=torch.from_numpy(rec["z"].astype(np.int64)),
        cell=floats(rec["cell"], (1, 3, 3)),
        pbc=torch.from_numpy(rec["pbc"].reshape(1, 3)),
        edge_index=torch.from_numpy(edge_index),
        cell_offsets=torch.from_numpy(offsets.astype(float_type)),
        energy=floats(rec["energy"] if rec["has_energy"] else np.nan, (1,)),
        forces=floats(rec["forces"] if has_forces else np.full((n, 3), np.nan)),
        stress=floats(rec["stress"] if has_stress else np.full((3, 3), np.nan), (1, 3, 3)),
        has_energy=flags[0],
        has_forces=flags[1],
        has_stress=flags[2],
        fixed=torch.from_numpy(rec["fixed"].astype(bool)),
        tags=torch.from_numpy(rec["tags"].astype(np.int64)),
        num_atoms=torch.from_numpy(np.array([n])),
    )


# ------------------------------------------------------------------------------------------------------ reading


class GraphStore:
    """Read access to a complete store: records by index, their info, and the manifest.

    The constructor checks the manifest and that the record database holds as many records as it says. The LMDB
    environment itself is opened on first use in each process (DataLoader workers, DDP ranks), read-only; an
    instance pickles without its handles.

    Args:
        path: the store directory.

    Raises:
        StoreError: missing, incomplete or corrupted store (see :func:`read_manifest`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._pid: int | None = None
        self._txn = self._dbs = None
        self._check_count()

    def _corrupted(self, what: str) -> StoreError:
        return StoreError(f"graph store '{self.path}' is corrupted ({what}); rebuild it with "
                          f"{rebuild_hint(self.manifest, self.path)} plus --overwrite")

    def _check_count(self) -> None:
        try:
            txn, dbs = self._handles()
            n = txn.stat(dbs[b"records"])["entries"]
        except lmdb.Error as err:
            raise self._corrupted(f"its LMDB file cannot be read: {err}") from None
        if n != self.manifest["num_records"]:
            raise self._corrupted(f"it holds {n} records, its manifest says {self.manifest['num_records']}")

    def _handles(self) -> tuple[lmdb.Transaction, dict[bytes, Any]]:
        if self._pid != os.getpid():
            self._txn, self._dbs = _reader(self.path)
            self._pid = os.getpid()
        return self._txn, self._dbs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_txn": None, "_dbs": None}

    def __len__(self) -> int:
        return int(self.manifest["num_records"])

    def where(self, index: int) -> str:
        return f"graph store '{self.path}', record {index}"

    def read(self, index: int) -> dict[str, Any]:
        """Record ``index`` decoded (numpy arrays, see :func:`decode_record`)."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.where(index)}: out of range, the store holds {len(self)} records")
        txn, dbs = self._handles()
        buf = txn.get(record_key(index), db=dbs[b"records"])
        if buf is None:
            raise self._corrupted(f"record {index} is missing")
        try:
            return decode_record(buf, f"record {index}")
        except StoreError as err:
            raise self._corrupted(str(err)) from None

    def verify(self) -> int:
        """Check the checksum of every record (one sequential scan); returns the number checked.

        Raises:
            StoreError: the first corrupted or missing record, with the command that rebuilds the store.
        """
        txn, dbs = self._handles()
        count = 0
        for key, value in txn.cursor(db=dbs[b"records"]):
            index = int.from_bytes(bytes(key), "big")
            if index != count:
                raise self._corrupted(f"record {count} is missing")
            try:
                decode_record(value, f"record {index}")
            except StoreError as err:
                raise self._corrupted(str(err)) from None
            count += 1
        if count != len(self):
            raise self._corrupted(f"{count} records found, the manifest says {len(self)}")
        return count

    def info(self, index: int) -> dict[str, Any]:
        """The scalar ``atoms.info`` values stored with record ``index`` (plus ``index`` in the source stream)."""
        txn, dbs = self._handles()
        buf = txn.get(record_key(index), db=dbs[b"info"])
        if buf is None:
            raise self._corrupted(f"the info of record {index} is missing")
        return json.loads(bytes(buf))

    def iter_info(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(record index, info)`` for every record, in order, by one cursor scan (no graph is decoded)."""
        txn, dbs = self._handles()
        for key, value in txn.cursor(db=dbs[b"info"]):
            yield int.from_bytes(bytes(key), "big"), json.loads(bytes(value))


class StoreDataset(Dataset):
    """A map-style dataset of :class:`AtomicGraph` read from a graph store, optionally restricted to ``indices``.

    Args:
        path: the store directory (or an open :class:`GraphStore`).
        cutoff: neighbour radius of the graphs, Å; at most the store's cutoff when it holds edges (then edges
            beyond ``cutoff`` are dropped); required for a store without edges. None takes the store's.
        dtype: floating dtype of the graphs (``"float32"`` or ``"float64"``).
        indices: record indices this dataset covers, in order (None: all).

    Raises:
        StoreError: bad store (see :class:`GraphStore`), or a cutoff the store cannot serve.
    """

    def __init__(self, path: str | os.PathLike | GraphStore, cutoff: float | None = None,
                 dtype: str | torch.dtype = "float32", indices: Sequence[int] | np.ndarray | None = None) -> None:
        self.store = path if isinstance(path, GraphStore) else GraphStore(path)
        m = self.store.manifest
        self.stored_cutoff = m["cutoff"] if m["edges"] else None
        if cutoff is None:
            if self.stored_cutoff is None:
                raise StoreError(f"graph store '{self.store.path}' holds no edges: give the cutoff to build them at")
            cutoff = self.stored_cutoff
        if self.stored_cutoff is not None and float(cutoff) > self.stored_cutoff + 1e-9:
            raise StoreError(
                f"graph store '{self.store.path}' holds edges up to {self.stored_cutoff} Å but cutoff={cutoff} Å was "
                f"asked for; set cutoff={self.stored_cutoff} (or less), or rebuild the store at the larger cutoff "
                f"(`potentials preprocess ... cutoff={cutoff}`, or --no-edges to build edges while training)"
            )
        self.cutoff = float(cutoff)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self.dtype == torch.float64 and m["dtype"] == "float32" and indices is None:
            log.warning("graph store %s holds float32 values; training in float64 from it keeps float32 precision "
                        "(rebuild with dtype=float64 for exact positions)", self.store.path)

    def __len__(self) -> int:
        return len(self.store) if self.indices is None else len(self.indices)

    def record_index(self, k: int) -> int:
        """The store record behind item ``k`` of this dataset."""
        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for a dataset of {len(self)} structures")
        k = k % len(self)
        return k if self.indices is None else int(self.indices[k])

    def __getitem__(self, k: int) -> AtomicGraph:
        rec = self.store.read(self.record_index(int(k)))
        return graph_from_record(rec, self.cutoff, self.stored_cutoff, self.dtype)

    def __iter__(self) -> Iterator[AtomicGraph]:
        for k in range(len(self)):
            yield self[k]

    def subset(self, indices: Sequence[int] | np.ndarray) -> StoreDataset:
        """The items at ``indices`` of this dataset, as a dataset over the same store."""
        indices = np.asarray(indices, dtype=np.int64)
        chosen = indices if self.indices is None else self.indices[indices]
        return StoreDataset(self.store, self.cutoff, self.dtype, indices=chosen)

    # ----------------------------------------------------------------------- cached scans (beside the store)

    def _cache_file(self, kind: str, key: dict, suffix: str) -> Path:
        key = {"store": self.store.manifest["checksum"], **key}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.store.path / "cache" / f"{kind}-{digest}{suffix}"

    def groups(self, key: str) -> np.ndarray:
        """[len(self)] int64 codes of ``info[key]`` per item (equal codes = equal values), cached in the store.

        Raises:
            StoreError: a record has no such info key (the message names it and lists the stored keys).
        """
        file = self._cache_file("groups", {"key": key}, ".npy")
        codes = _load(file, np.load)
        if codes is None or len(codes) != len(self.store):
            values: dict[Any, int] = {}
            codes = np.empty(len(self.store), dtype=np.int64)
            for i, info in self.store.iter_info():
                if key not in info:
                    raise StoreError(f"{self.store.where(i)}: split.group_by={key!r} but the record has no such info "
                                     f"key; stored keys: {self.store.manifest.get('info_keys')}")
                codes[i] = values.setdefault(info[key], len(values))
            _save(file, lambda fh: np.save(fh, codes))
        return codes if self.indices is None else codes[self.indices]

    def cached_stats(self) -> DatasetStats:
        """:func:`compute_stats` of this dataset, computed in one streaming pass and cached in the store."""
        items = np.arange(len(self.store)) if self.indices is None else self.indices
        file = self._cache_file("stats", {"cutoff": self.cutoff, "dtype": str(self.dtype),
                                          "indices": hashlib.sha256(items.tobytes()).hexdigest()}, ".json")
        cached = _load(file, lambda fh: json.load(fh))
        if cached is not None:
            cached["atomic_energies"] = {int(z): e for z, e in cached["atomic_energies"].items()}
            return DatasetStats(**cached)
        log.info("computing statistics of %d structures from %s (cached for later runs)", len(self), self.store.path)
        stats = compute_stats(iter(self))
        _save(file, lambda fh: fh.write(json.dumps(stats.to_dict()).encode()))
        return stats


#: Read handles per store file and process: ``(st_dev, st_ino) of data.mdb → (pid, env, txn, dbs)``.
_READERS: dict[tuple[int, int], tuple[int, lmdb.Environment, lmdb.Transaction, dict[bytes, Any]]] = {}


def _reader(path: Path) -> tuple[lmdb.Transaction, dict[bytes, Any]]:
    """This process's read transaction on the store at ``path`` and its databases, opened on first use.

    LMDB allows one handle per environment and process, and a handle must not be used across ``fork``: a
    handle inherited from the parent is closed (which touches nothing of the parent's) and a new one opened.
    The transaction lives as long as the process; a complete store is never written again.
    """
    st = (path / "data.mdb").stat()
    key = (st.st_dev, st.st_ino)
    entry = _READERS.get(key)
    if entry is not None and entry[0] == os.getpid():
        return entry[2], entry[3]
    if entry is not None:
        entry[1].close()
    env = open_environment(path, write=False)
    dbs = {name: env.open_db(name, create=False) for name in DATABASES}
    txn = env.begin(buffers=True)
    _READERS[key] = (os.getpid(), env, txn, dbs)
    return txn, dbs


def _load(file: Path, reader) -> Any:
    if not file.is_file():
        return None
    try:
        with open(file, "rb") as fh:
            return reader(fh)
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable cache file %s (%s)", file, err)
        return None


def _save(file: Path, writer) -> None:
    """Write a cache file atomically; a read-only store only loses the cache (with a warning)."""
    try:
        file.parent.mkdir(exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            writer(fh)
        os.replace(tmp, file)
    except OSError as err:
        log.warning("cannot write the cache file %s (%s); it will be computed again next time", file, err)
