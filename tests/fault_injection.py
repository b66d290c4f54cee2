"""Faults on purpose, for the tests that kill `train.py` runs: a checkpoint writer that pauses or dies in the middle
of a write, and callbacks that die during validation, slow training down or save every step's state.

All of them are given to `train.py` on its command line, e.g.
``"trainer.plugins=[{_target_:tests.fault_injection.FaultyCheckpointIO,pause:60}]"`` or
``+callbacks.die._target_=tests.fault_injection.DieInValidation``. A run that dies here sends SIGKILL to its whole
process group (every rank of a DDP run) when it leads that group — the tests start it with ``start_new_session``
— and to itself otherwise.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch

from potentials.training.checkpointing import AtomicCheckpointIO


def die() -> None:
    """SIGKILL this run: its process group when this process leads it, else this process alone."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class FaultyCheckpointIO(AtomicCheckpointIO):
    """The atomic checkpoint writer, with a pause or a kill inside writes that replace an existing checkpoint.

    Args:
        pause: seconds to wait with the temporary file complete, before it is renamed over the existing checkpoint.
        die_at: the write (1, 2, … among this process's writes over an existing checkpoint) during which the run is
            killed; None: none.
        stage: where in that write: ``"half"`` (half of the temporary file written) or ``"written"`` (the temporary
            file complete and flushed, not yet renamed).
    """

    def __init__(self, pause: float = 0.0, die_at: int | None = None, stage: str = "half") -> None:
        super().__init__()
        if stage not in ("half", "written"):
            raise ValueError(f"stage must be half or written, got {stage!r}")
        self.pause, self.die_at, self.stage = float(pause), die_at, stage
        self._replacing = 0  # writes over an existing checkpoint so far
        self._target: Path | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self._target = Path(path)
        if self._target.exists():
            self._replacing += 1
        super().save_checkpoint(checkpoint, path, storage_options)

    def _dies_now(self, stage: str) -> bool:
        return (self.die_at is not None and self.stage == stage and self._target is not None
                and self._target.exists() and self._replacing == self.die_at)

    def write(self, checkpoint: dict[str, Any], file: BinaryIO) -> None:
        if not self._dies_now("half"):
            return super().write(checkpoint, file)
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        file.write(buffer.getbuffer()[:buffer.tell() // 2])
        file.flush()
        os.fsync(file.fileno())
        die()

    def replace(self, tmp: Path, path: Path) -> None:
        if self._dies_now("written"):
            die()
        if self.pause > 0 and path.exists():
            time.sleep(self.pause)
        super().replace(tmp, path)


class DieInValidation(L.Callback):
    """Kills the run in the middle of its first validation after ``after_step`` optimiser steps (on rank 0).

    Args:
        after_step: the global step from which on validation is deadly.
    """

    def __init__(self, after_step: int = 0) -> None:
        self.after_step = int(after_step)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.is_global_zero and trainer.global_step >= self.after_step and not trainer.sanity_checking:
            die()


class DieAtEpochStart(L.Callback):
    """Kills the run when an epoch starts (on rank 0): ``last.ckpt`` is then the one taken at the previous epoch's end.

    Args:
        after_step: the global step from which on epoch starts are deadly.
    """

    def __init__(self, after_step: int = 1) -> None:
        self.after_step = int(after_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.global_step >= self.after_step:
            die()


class Slow(L.Callback):
    """Sleeps after every training step, so that a kill at a random moment finds the run still training.

    Args:
        seconds: the sleep per step.
    """

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        time.sleep(self.seconds)


class SaveSteps(L.Callback):
    """Saves ``<folder>/step<N>.pt`` after every optimiser step N: the module's state dict (weights and EMA).

    Args:
        folder: where the files go.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            torch.save(state, self.folder / f"step{trainer.global_step}.pt")
