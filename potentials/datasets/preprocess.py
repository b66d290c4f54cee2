"""Convert any adapter's ``ase.Atoms`` stream into a graph store (:mod:`potentials.datasets.store`), resumably.

Records are written in transactions of ``commit_every`` records; each transaction also stores the conversion's
progress (frames consumed from the source, records written, frames skipped, source checksums). Killed at any
point (even by SIGKILL) and run again with the same settings, :func:`convert` skips the frames already consumed
and goes on, so every frame ends up in the store exactly once, in source order. The manifest's ``complete`` flag
is set last, after the data is synced to disk.

Every frame is checked before it is stored: atomic numbers in 1..118, finite positions, cell and labels (with
:mod:`potentials.datasets.validate`), forces of shape [N, 3], no two atoms closer than
:data:`potentials.graph.MIN_DISTANCE`. A bad frame stops the conversion with an error naming file, frame and
field (what was converted before it is kept, and a rerun resumes), or, with ``skip_invalid``, is left out,
counted and listed in the manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from ase import Atoms

from potentials import __version__
from potentials.datasets.store import (
    DATABASES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    StoreError,
    encode_record,
    open_environment,
    read_manifest,
    record_key,
    write_manifest,
)
from potentials.datasets.validate import as_voigt_stress, check_finite, check_shape, where
from potentials.graph import AtomicGraph

log = logging.getLogger(__name__)

#: Skipped frames listed one by one in the manifest (all are counted).
MAX_LISTED_SKIPS = 1000
_PROGRESS = b"progress"
_SOURCE = b"source:"


def convert(
    source: Callable[[], Iterable[Atoms]],
    out: str | os.PathLike,
    *,
    cutoff: float,
    dtype: str = "float32",
    edges: bool = True,
    skip_invalid: bool = False,
    commit_every: int = 1000,
    workers: int = 0,
    overwrite: bool = False,
    source_config: dict | None = None,
    search_paths: Sequence[str | os.PathLike] = (),
    command: str | None = None,
    log_every: float = 30.0,
) -> dict[str, Any]:
    """Write (or finish) the graph store ``out`` from the frames ``source()`` yields.

    Args:
        source: a callable returning an iterable of labelled ``ase.Atoms`` (an adapter's ``read`` with its options
            bound). It is called again on resume and must yield the same frames in the same order.
        out: the store directory (created; must be empty, absent, or a store built with the same settings).
        cutoff: neighbour radius of the stored edges, Å (with ``edges=False`` the edges are built when reading).
        dtype: ``"float32"`` or ``"float64"``: precision of positions, cell and labels on disk.
        edges: store edges (training does no neighbour search) or positions and labels only (about ten times
            smaller at a 5–6 Å cutoff).
        skip_invalid: leave invalid frames out (counted and listed in the manifest) instead of stopping.
        commit_every: frames per transaction; a kill loses at most this much work.
        workers: processes building graphs in parallel (0: in this process). Frames keep source order.
        overwrite: delete an existing store at ``out`` first.
        source_config: the adapter's configuration, recorded in the manifest and compared on resume.
        search_paths: files and directories where the files named by ``atoms.info["source"]`` are looked up to
            record their size and sha256 (files among them are recorded in any case).
        command: the command that rebuilds the store, quoted in error messages.
        log_every: seconds between progress messages (which also refresh the manifest's record count).

    Returns:
        The manifest of the complete store.

    Raises:
        StoreError: ``out`` is not a store, holds one built with other settings, or its sources changed since
            the conversion started.
        ValueError: an invalid frame (without ``skip_invalid``); the message names file, frame and field.
    """
    out = Path(out)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    settings = json.loads(json.dumps({"cutoff": float(cutoff), "edges": bool(edges), "dtype": dtype,
                                      "source_config": source_config}))
    manifest = _prepare_directory(out, settings, overwrite, command)
    if manifest.get("complete"):
        log.info("graph store %s is already complete (%d records)", out, manifest["num_records"])
        return manifest

    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 0 else None  # before LMDB is opened
    writer = None
    try:
        writer = _Writer(out, search_paths)
        progress = writer.progress
        started, last_log, consumed0 = time.perf_counter(), time.perf_counter(), progress["consumed"]
        if consumed0:
            log.info("resuming %s after %d frames (%d records stored)", out, consumed0, progress["written"])
        prepare = partial(_prepare, cutoff=float(cutoff), float_bytes=4 if dtype == "float32" else 8, edges=edges)
        frames = itertools.islice(enumerate(source()), consumed0, None)
        writer.record_given_files()
        results = pool.imap(prepare, frames, chunksize=16) if pool else map(prepare, frames)
        for item in results:
            if item["error"] is not None:
                message = f"{item['where']}: {item['error']}"
                if not skip_invalid:
                    raise ValueError(
                        f"{message}. Repair or remove that frame, or rerun with --skip-invalid to leave invalid "
                        "frames out (they are counted and listed in the manifest); the "
                        f"{progress['written'] + len(writer.batch)} records converted so far are kept and the rerun "
                        "resumes after them"
                    )
                log.warning("skipping %s", message)
            writer.add(item)
            if len(writer.batch) >= commit_every:
                writer.commit()
            if time.perf_counter() - last_log > log_every:
                last_log = time.perf_counter()
                writer.commit()
                rate = (progress["consumed"] - consumed0) / (last_log - started)
                log.info("%s: %d records stored (%.0f frames/s)", out, progress["written"], rate)
                write_manifest(out, {**manifest, "num_records": progress["written"]})
        manifest = writer.finish(manifest)
    finally:
        if pool is not None:
            pool.terminate()
        if writer is not None:
            writer.close()  # commits the work done before an error; a rerun resumes after it
    log.info("graph store %s complete: %d records, %d skipped, %.1f s", out, manifest["num_records"],
             manifest["num_skipped"], time.perf_counter() - started)
    return manifest


def _prepare_directory(out: Path, settings: dict, overwrite: bool, command: str | None) -> dict:
    """The manifest to continue from: a fresh one, or the existing one when resuming or already complete."""
    if overwrite and out.exists():
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise StoreError(f"'{out}' is not a graph store (no {MANIFEST}); refusing to delete it with --overwrite")
        shutil.rmtree(out)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out, require_complete=False)
        changed = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise StoreError(f"'{out}' holds a graph store built with other settings ({detail}); choose another "
                             "output directory, or add --overwrite to replace it")
        return manifest
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"'{out}' exists and is not a graph store (no {MANIFEST}); give an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    return write_manifest(out, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False, "num_records": 0, **settings,
        "command": command, "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


class _Writer:
    """The open LMDB environment, the pending batch and the progress that commits with it."""

    def __init__(self, out: Path, search_paths: Sequence[str | os.PathLike]) -> None:
        self.out = out
        self.env = open_environment(out, write=True)
        self.dbs = {name: self.env.open_db(name) for name in DATABASES}
        self.batch: list[dict] = []
        self.new_sources: dict[str, dict] = {}
        with self.env.begin(db=self.dbs[b"meta"]) as txn:
            raw = txn.get(_PROGRESS)
            self.sources = {bytes(k)[len(_SOURCE):].decode(): json.loads(v) for k, v in txn.cursor()
                            if bytes(k).startswith(_SOURCE)}
        self.progress = json.loads(raw) if raw else {
            "consumed": 0, "written": 0, "num_skipped": 0, "skipped": [], "num_atoms": 0, "num_edges": 0,
            "info_keys": []}
        self.finder = _SourceFinder(search_paths)
        self._verify_sources()

    def record_given_files(self) -> None:
        """Record the files among the search paths (after the adapter has run, which may have written them)."""
        for path in self.finder.existing()[0]:
            self._source(path.name)

    def _verify_sources(self) -> None:
        for entry in self.sources.values():
            path = Path(entry["path"]) if entry["path"] else None
            if entry["sha256"] and (not path.is_file() or _sha256(path) != entry["sha256"]):
                raise StoreError(
                    f"source file {entry['path']} is missing or changed since the conversion into '{self.out}' "
                    "started (sha256 differs), so the records already stored may not match it; add --overwrite "
                    "to start afresh")

    def _source(self, name: str) -> None:
        if name in self.sources or name in self.new_sources:
            return
        path = self.finder.find(name)
        entry = {"name": name, "path": str(path) if path else None, "bytes": path.stat().st_size if path else None,
                 "sha256": _sha256(path) if path else None}
        if path is None:
            log.warning("source %r named by the frames was not found on disk; no checksum recorded", name)
        self.new_sources[name] = entry

    def add(self, item: dict) -> None:
        info = item["info"]
        if isinstance(info.get("source"), str):
            self._source(info["source"])
        p = self.progress
        p["consumed"] = item["index"] + 1
        if item["error"] is not None:
            p["num_skipped"] += 1
            if len(p["skipped"]) < MAX_LISTED_SKIPS:
                p["skipped"].append({"index": item["index"], "where": item["where"], "error": item["error"]})
            return
        self.batch.append(item)

    def commit(self) -> None:
        while True:
            try:
                self._commit()
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _commit(self) -> None:
        p = dict(self.progress)
        keys = set(p["info_keys"])
        with self.env.begin(write=True) as txn:
            written = p["written"]
            for item in self.batch:
                key = record_key(written)
                txn.put(key, item["record"], db=self.dbs[b"records"], append=True)
                txn.put(key, json.dumps(item["info"]).encode(), db=self.dbs[b"info"], append=True)
                keys.update(item["info"])
                p["num_atoms"] += item["num_atoms"]
                p["num_edges"] += item["num_edges"]
                written += 1
            p["written"], p["info_keys"] = written, sorted(keys)
            for name, entry in self.new_sources.items():
                txn.put(_SOURCE + name.encode(), json.dumps(entry).encode(), db=self.dbs[b"meta"])
            txn.put(_PROGRESS, json.dumps(p).encode(), db=self.dbs[b"meta"])
        self.progress.update(p)
        self.sources.update(self.new_sources)
        self.new_sources.clear()
        self.batch.clear()

    def close(self) -> None:
        if self.env is not None:
            self.commit()
            self.env.close()
            self.env = None

    def finish(self, manifest: dict) -> dict:
        self.commit()
        self.env.sync(True)
        with self.env.begin(db=self.dbs[b"records"]) as txn:
            n = txn.stat(self.dbs[b"records"])["entries"]
        self.env.close()
        self.env = None
        p = self.progress
        if n != p["written"]:
            raise StoreError(f"graph store '{self.out}': {n} records on disk but {p['written']} committed; "
                             "add --overwrite to rebuild it")
        return write_manifest(self.out, {
            **manifest, "complete": True, "num_records": n, "num_skipped": p["num_skipped"],
            "skipped": p["skipped"], "num_atoms": p["num_atoms"], "num_edges": p["num_edges"],
            "info_keys": p["info_keys"], "sources": sorted(self.sources.values(), key=lambda s: s["name"]),
            "completed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bytes": (self.out / "data.mdb").stat().st_size,
        })


class _SourceFinder:
    """Finds a file by name among the given files and inside the given directories.

    Paths that do not exist are ignored; existence is checked on first use (an adapter may create its files),
    and directories are walked once.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in paths]
        self._index: dict[str, Path] | None = None

    def existing(self) -> tuple[list[Path], list[Path]]:
        """(files, directories) among the paths, resolved."""
        paths = [p.resolve() for p in self.paths if p.exists()]
        return [p for p in paths if p.is_file()], [p for p in paths if p.is_dir()]

    def find(self, name: str) -> Path | None:
        files, dirs = self.existing()
        for f in files:
            if f.name == name:
                return f
        if self._index is None:
            self._index = {}
            for d in dirs:
                for root, _, names in os.walk(d):
                    for n in names:
                        self._index.setdefault(n, Path(root) / n)
        return self._index.get(name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare(item: tuple[int, Atoms], *, cutoff: float, float_bytes: int, edges: bool) -> dict[str, Any]:
    """Check and encode frame ``item = (index in the source stream, atoms)``; errors are returned, not raised."""
    index, atoms = item
    info = {k: v.item() if isinstance(v, np.generic) else v for k, v in atoms.info.items()}
    info = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
    info["index"] = index
    source, frame = str(info.get("source", "source")), info.get("frame", index)
    out = {"index": index, "info": info, "where": f"{where(source, frame)} (frame {index} of the source stream)",
           "error": None}
    try:
        check_frame(atoms, source=source, record=frame)
        graph = AtomicGraph.from_atoms(atoms, cutoff, dtype=torch.float64)
        graph.validate(where(source, frame))
        graph.check_distances(where(source, frame))
        out["record"] = encode_record(graph, float_bytes, edges)
    except ValueError as err:
        out["error"] = str(err)
        return out
    out["num_atoms"], out["num_edges"] = len(atoms), int(graph.edge_index.shape[1]) if edges else 0
    return out


def check_frame(atoms: Atoms, *, source: str, record: int | str) -> None:
    """Raise ``ValueError`` (naming file, frame and field) if a frame cannot make a valid training record."""
    numbers = atoms.numbers
    bad = numbers[(numbers < 1) | (numbers > 118)]
    if bad.size:
        raise ValueError(f"{where(source, record, 'numbers')}: atomic number {int(bad[0])} outside 1..118")
    check_finite(atoms.positions[None], source=source, field="positions", frame_ids=[record])
    if atoms.pbc.any():
        check_finite(atoms.cell.array[None], source=source, field="cell", frame_ids=[record])
    results = getattr(atoms.calc, "results", None) or {}
    for field in ("energy", "forces", "stress"):
        value = results.get(field)
        if value is None:
            continue
        if field == "forces":
            check_shape(value, (len(atoms), 3), source=source, field=field, record=record)
        if field == "stress":
            value = as_voigt_stress(value, source=source, record=record)
        check_finite(np.reshape(value, (1, -1)), source=source, field=field, frame_ids=[record])


def conversion_progress(out: str | os.PathLike) -> dict[str, Any] | None:
    """The progress last committed by a conversion into ``out`` (frames ``consumed``, records ``written``, ...).

    Safe while the conversion runs in another process (a locked read-only transaction); None before the first
    commit.
    """
    out = Path(out)
    if not (out / "data.mdb").is_file():
        return None
    env = lmdb.open(str(out), readonly=True, lock=True, max_dbs=len(DATABASES), subdir=True)
    try:
        with env.begin() as txn:
            raw = txn.get(_PROGRESS, db=env.open_db(b"meta", txn=txn, create=False))
    except lmdb.Error:
        return None
    finally:
        env.close()
    return json.loads(raw) if raw else None
