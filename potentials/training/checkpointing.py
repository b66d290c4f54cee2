"""Checkpoints that survive a kill at any moment, and the choice of the checkpoint a rerun resumes from.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin) writes every checkpoint to a temporary file in
  the checkpoint's own directory, flushes it to disk and renames it into place with ``os.replace``: a reader sees
  the previous complete file or the new complete file, never a partial one. A kill mid-write leaves only a
  stray ``.<name>.*.tmp`` file, removed by :func:`remove_stale_temporaries` on the next start.
* :func:`checkpoint_callbacks`: ``best.ckpt`` (lowest monitored metric) and ``last.ckpt``, rewritten at every epoch
  end and, mid-epoch, every N optimiser steps or M minutes, so a kill loses at most that much training.
* :func:`resume_path` picks what ``resume=auto`` continues from: the newest complete of ``last.ckpt`` and Lightning's
  SLURM ``hpc_ckpt_*.ckpt`` (written on SIGUSR1 before a requeue).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from potentials.errors import PotentialsInputError

log = logging.getLogger("potentials")

#: Suffix of the temporary files checkpoints are written to before being renamed into place.
TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace`` onto the target.

    Remote paths (``s3://`` …) fall back to Lightning's own writer. The two steps are methods, :meth:`write` and
    :meth:`replace`, so that a subclass can observe or interrupt a write between them.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        try:
            with open(tmp, "xb") as f:  # same directory as the target, so that os.replace is atomic
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            self.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    def write(self, checkpoint: dict[str, Any], file: BinaryIO) -> None:
        """Serialise ``checkpoint`` into ``file``, the open temporary file."""
        torch.save(checkpoint, file)

    def replace(self, tmp: Path, path: Path) -> None:
        """Rename the complete temporary file ``tmp`` over ``path`` (atomic: both are in one directory)."""
        os.replace(tmp, path)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files left in ``directory`` by checkpoint writes that were killed; returns them."""
    directory = Path(directory)
    stale = sorted(directory.glob(f".*{TMP_SUFFIX}")) if directory.is_dir() else []
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if stale:
        log.info("removed %d incomplete checkpoint file(s) left by an interrupted write in %s", len(stale), directory)
    return stale


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole ``torch.save`` zip archive (its end-of-archive record is present)."""
    return zipfile.is_zipfile(path)


def resume_path(resume: str | os.PathLike | bool | None, run_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from, or None to start afresh.

    Args:
        resume: ``"auto"`` (the newest complete of ``<run_dir>/checkpoints/last.ckpt`` and
            ``<run_dir>/hpc_ckpt_*.ckpt``, or None when there is none), ``"never"``/None/False, or a path.
        run_dir: the run directory.

    Raises:
        PotentialsInputError: an explicit path that does not exist or is not a complete checkpoint.
    """
    if resume in (None, "never", False):
        return None
    run_dir = Path(run_dir)
    if resume == "auto":
        candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
        complete = []
        for path in candidates:
            if not path.is_file():
                continue
            if is_complete(path):
                complete.append(path)
            else:
                log.warning("ignoring %s: not a complete checkpoint (an interrupted copy?)", path)
        return str(max(complete, key=lambda p: p.stat().st_mtime)) if complete else None
    path = Path(resume)
    if not path.is_file():
        raise PotentialsInputError(f"resume={resume}: no checkpoint file there (resume=auto continues the run in "
                                   "hydra.run.dir, resume=never starts afresh)")
    if not is_complete(path):
        raise PotentialsInputError(f"resume={resume}: the file is truncated or not a Lightning checkpoint")
    return str(path)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global (optimiser) step a checkpoint was taken at; memory-maps the file instead of reading it all."""
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def checkpoint_callbacks(dirpath: str | os.PathLike, monitor: str, every_n_train_steps: int | None = None,
                         every_n_minutes: float | None = None) -> tuple[ModelCheckpoint, list[ModelCheckpoint]]:
    """The ``best`` checkpoint callback and all checkpoint callbacks, in the order Lightning should run them.

    ``best.ckpt`` is rewritten when ``monitor`` improves; ``last.ckpt`` at every epoch end and, when asked, every
    ``every_n_train_steps`` optimiser steps or every ``every_n_minutes`` of training (one of the two), mid-epoch
    included. ``best`` runs first so that ``last.ckpt`` records its updated state.

    Raises:
        PotentialsInputError: both mid-epoch triggers are set, or one is not positive.
    """
    if every_n_train_steps and every_n_minutes:
        raise PotentialsInputError("checkpoint.every_n_train_steps and checkpoint.every_n_minutes are both set; "
                                   "choose one (set the other to null)")
    for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_minutes", every_n_minutes)):
        if value is not None and value <= 0:
            raise PotentialsInputError(f"checkpoint.{name}={value}: must be positive, or null to switch it off")
    common = dict(dirpath=dirpath, auto_insert_metric_name=False, enable_version_counter=False, mode="min")
    best = ModelCheckpoint(filename="best", monitor=monitor, save_top_k=1, **common)
    callbacks = [best, ModelCheckpoint(filename="last", monitor=None, save_top_k=1, **common)]
    if every_n_train_steps or every_n_minutes:
        interval = timedelta(minutes=every_n_minutes) if every_n_minutes else None
        callbacks.append(ModelCheckpoint(filename="last", monitor=None, save_top_k=1, every_n_train_steps=
                                         every_n_train_steps, train_time_interval=interval, **common))
    return best, callbacks
