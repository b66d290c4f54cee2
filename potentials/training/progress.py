"""Training progress as plain log lines, for runs whose output goes to a file rather than a terminal.

Lightning's progress bar redraws itself with carriage returns many times a second; written to a file (a batch job's
output, ``potentials train > train.log``) that is megabytes of redraws. :class:`TextProgress` writes one line at the
end of every training epoch (after its validation) and, within long epochs, one every ``every_n_steps`` batches, to
the ``potentials`` logger: Hydra sends it to the console and to ``<run_dir>/train.log``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar

log = logging.getLogger("potentials")

#: Mid-epoch lines come every this many batches at least (short epochs: the epoch line only) ...
MIN_EVERY_N_STEPS = 50
#: ... and about this many times per epoch in long ones.
LINES_PER_EPOCH = 10
#: Mid-epoch interval when the epoch length is unknown (an iterable dataset).
UNSIZED_EVERY_N_STEPS = 1000


class TextProgress(ProgressBar):
    """One log line per training epoch, and every ``every_n_steps`` batches within an epoch.

    Args:
        every_n_steps: batches between mid-epoch lines; None picks a tenth of the epoch, at least
            :data:`MIN_EVERY_N_STEPS` (so an epoch shorter than that gets its end-of-epoch line only).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._started = time.monotonic()
        self._validated = False  # whether this epoch's validation ran (else the val/ metrics are an older epoch's)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs)

    def interval(self, batches_per_epoch: float) -> int:
        """Batches between mid-epoch lines for an epoch of ``batches_per_epoch`` (``inf`` when unknown)."""
        if self.every_n_steps is not None:
            return self.every_n_steps
        if math.isinf(batches_per_epoch):
            return UNSIZED_EVERY_N_STEPS
        return max(MIN_EVERY_N_STEPS, math.ceil(batches_per_epoch / LINES_PER_EPOCH))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = self.total_train_batches
        done = batch_idx + 1
        if self._enabled and done % self.interval(total) == 0 and done < total:
            size = "" if math.isinf(total) else f"/{int(total)}"
            self._line(trainer, [f"batch {done}{size}"], validation=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            self._line(trainer, [], validation=self._validated)

    def _line(self, trainer: L.Trainer, where: Sequence[str], validation: bool) -> None:
        """``epoch E/M | [batch b/B |] step S | loss L | [val/... V |] T s``: S counts optimiser steps so far."""
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        parts = [f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs else ""), *where,
                 f"step {trainer.global_step}"]
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        loss = metrics.get("train/loss_step")
        if loss is not None:
            parts.append(f"loss {float(loss):.5g}")
        if validation:
            parts += [f"{k} {float(v):.5g}" for k, v in metrics.items() if k.startswith("val/")]
        parts.append(f"{time.monotonic() - self._started:.0f} s")
        log.info(" | ".join(parts))


def plain_progress(callbacks: Sequence[Callback], enabled: bool, stream: Any = None) -> list[Callback]:
    """[TextProgress()] when the progress display is on but ``stream`` (stdout) is not a terminal, and no progress
    callback was configured; else []. On a terminal Lightning's own bar stays."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not enabled or (isatty is not None and isatty()) or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [TextProgress()]
