"""LMDB files of pickled PyTorch Geometric ``Data`` records (OC20's S2EF/IS2RE releases before fairchem v2).

Layout: one LMDB environment per file (``data.lmdb`` or ``data.0000.lmdb``, opened with ``subdir=False``); keys
are ASCII integers ``"0"`` … ``"N-1"`` and older files add ``"length"`` (a pickled int). Each value is
``pickle.dumps(torch_geometric.data.Data)``. Reading one runs ``pickle``, which executes whatever code the file
names, so :func:`iter_records` refuses unless told the file is trusted.

PyG changed how ``Data`` pickles: 1.x objects keep their fields in ``__dict__``; 2.x objects keep them in a
``GlobalStorage`` under ``_store``. :class:`TolerantUnpickler` maps every ``torch_geometric`` class to a plain
stand-in, so records of either generation load without PyG (or with any PyG version) installed, and
:func:`record_fields` returns the fields as a plain dict of numpy arrays and Python scalars.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from potentials.datasets.validate import InvalidRecordError, open_lmdb_file, where

#: Key of the record count in older files.
LENGTH_KEY = b"length"


class UntrustedPickleError(PermissionError):
    """Reading pickled records was refused because the caller did not declare the file trusted."""


class _Stand_in:  # noqa: N801 - named for what it is
    """What any pickled ``torch_geometric`` object becomes: its pickled state, kept as it is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Stand_in:  # pickled classes used as factories
        return _Stand_in(*args, **kwargs)


class TolerantUnpickler(pickle.Unpickler):
    """Unpickler that maps every ``torch_geometric.*`` class (``Data``, ``GlobalStorage``, ``DataEdgeAttr``,
    1.x ``Data``/``Batch`` ...) to a plain stand-in; tensors load through torch as usual."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch_geometric" or module.startswith("torch_geometric."):
            return _Stand_in
        return super().find_class(module, name)


def check_trusted(path: Path, trusted: bool) -> None:
    """Raise :class:`UntrustedPickleError` unless ``trusted``; warn when it is."""
    if not trusted:
        raise UntrustedPickleError(
            f"{where(path.name)}: its records are Python pickles (PyTorch Geometric Data objects), and unpickling "
            "runs any code the file asks for. Read it only if you trust where it came from (e.g. the official "
            "OC20 download, checksum verified): pass trusted=True (data.source.trusted=true in the config).")
    warnings.warn(f"{where(path.name)}: unpickling its records (trusted=True); only do this for files you trust",
                  UserWarning, stacklevel=3)


def iter_records(path: str | os.PathLike, *, trusted: bool = False) -> Iterator[tuple[int, dict[str, Any] | Exception]]:
    """``(index, fields)`` for every record of one LMDB file, in key order ``0 … N-1``.

    A record that cannot be unpickled yields ``(index, InvalidRecordError)`` instead, so callers may skip it.

    Args:
        path: the ``.lmdb`` file.
        trusted: confirm that the file may be unpickled (see the module docstring).

    Raises:
        UntrustedPickleError: ``trusted`` is False.
        ValueError: the file is not an LMDB environment, or a key ``0 … N-1`` is missing.
    """
    path = Path(path)
    check_trusted(path, trusted)
    env = open_lmdb_file(path)
    try:
        with env.begin(write=False) as txn:
            raw_length = txn.get(LENGTH_KEY)
            n = (pickle.loads(raw_length) if raw_length is not None  # noqa: S301 - trusted=True was given
                 else env.stat()["entries"])
            for i in range(int(n)):
                value = txn.get(str(i).encode("ascii"))
                if value is None:
                    raise ValueError(f"{where(path.name, i)}: key '{i}' is missing; the file holds {n} records "
                                     "and should have the keys 0 … N-1")
                try:
                    yield i, record_fields(TolerantUnpickler(io.BytesIO(value)).load())
                except Exception as exc:  # a damaged pickle raises anything
                    yield i, InvalidRecordError(
                        f"{where(path.name, i, 'pickle')}: cannot be unpickled ({type(exc).__name__}: {exc})",
                        source=path.name, record=i, field="pickle")
    finally:
        env.close()


def record_fields(obj: Any) -> dict[str, Any]:
    """The fields of an unpickled ``Data`` (1.x or 2.x stand-in, or a plain dict) as numpy arrays and scalars."""
    if isinstance(obj, _Stand_in):
        state = obj.__dict__
        store = state.get("_store")
        if isinstance(store, _Stand_in):
            mapping = store.__dict__.get("_mapping", {})
        else:
            mapping = {k: v for k, v in state.items() if not k.startswith("_")}
    elif isinstance(obj, dict):
        mapping = obj
    else:
        raise TypeError(f"expected a PyG Data object or a dict, got {type(obj).__name__}")
    return {key: _plain(value) for key, value in mapping.items() if value is not None}


def _plain(value: Any) -> Any:
    """torch tensors → numpy arrays (0-d → Python scalars); everything else unchanged."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value
