"""Loggers that continue where a resumed run left off.

* :class:`CSVLogger` keeps ``metrics.csv`` across reruns of the same run directory (Lightning's own deletes it).
  Rows logged after the checkpoint being resumed (the work redone after a kill) are dropped when the resumed run
  logs its first row, so every step appears once.
* :func:`wandb_run_id` stores the Weights & Biases run id in the run directory, so a resumed run logs to the same
  W&B run (``resume="allow"``) instead of starting a new one.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("potentials")

#: File in the run directory holding the W&B run id.
WANDB_ID_FILE = "wandb_run_id.txt"


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        self._previous: list[dict[str, str]] | None = None
        self._held: list[dict[str, str]] | None = None
        self._held_step = -1
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            # a row cut short by a kill has missing fields (None) or no readable step: drop it
            rows = [row for row in reader if None not in row.values() and None not in row and _step(row) is not None]
        self.metrics_keys = keys
        self._previous = rows

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if step is not None:
            if self._previous is not None:
                self._truncate(step)
            if self._held is not None:
                self._merge_held(step, set(metrics_dict))
        super().log_metrics(metrics_dict, step)

    def restore_row(self, metrics: dict[str, float], step: int) -> None:
        """Put back a row the previous run logged after its last checkpoint but may not have written."""
        if self._previous is None:
            return
        keys = [k for k in metrics if k != "epoch"]
        if any(_step(row) == step and any(row.get(k) not in (None, "") for k in keys) for row in self._previous):
            return  # it reached the disk
        row = {k: str(v) for k, v in metrics.items()}
        row["step"] = str(step)
        self.metrics_keys += [k for k in row if k not in self.metrics_keys]
        at = max((i + 1 for i, r in enumerate(self._previous) if _step(r) <= step), default=0)
        self._previous.insert(at, row)

    def _truncate(self, step: int) -> None:
        """Keep the earlier rows logged before ``step``; hold those at ``step`` until it is known which recur."""
        rows, self._previous = self._previous or [], None
        kept = [row for row in rows if _step(row) < step]
        self._held = [row for row in rows if _step(row) == step]
        self._held_step = step
        tmp = self.metrics_file_path + ".tmp"
        with self._fs.open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)
        dropped = len(rows) - len(kept) - len(self._held)
        if dropped:
            log.info("%s: dropped %d rows logged after the resumed checkpoint", self.metrics_file_path, dropped)

    def _merge_held(self, step: int, keys: set[str]) -> None:
        """Drop held rows the resumed run logs again; write back the others once the run moves past their step."""
        held = self._held or []
        if step == self._held_step:
            self._held = [row for row in held if not any(row.get(k) not in (None, "") for k in keys)]
            return
        self._held = None
        self.metrics.extend({k: v for k, v in row.items() if v != ""} for row in held)

    def save(self) -> None:
        if self._held is not None:
            self._merge_held(self._held_step + 1, set())
        super().save()


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger that continues ``<save_dir>/<name>/<version>/metrics.csv`` when a run resumes.

    Rows are also written out whenever a checkpoint is saved, so a run killed later keeps every row up to the
    checkpoint it resumes from.
    """

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()

    @rank_zero_only
    def restore_row(self, metrics: dict[str, float], step: int) -> None:
        """Put back ``metrics`` at ``step`` unless ``metrics.csv`` already holds them (see :class:`_ResumingWriter`)."""
        self.experiment.restore_row(metrics, step)

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumingWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_run_id(run_dir: str | os.PathLike) -> str:
    """The W&B run id of this run directory: read from ``<run_dir>/wandb_run_id.txt``, or created there (rank 0)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id style
    if rank_zero_only.rank == 0:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    return run_id


def resuming_logger_kwargs(target: str, run_dir: str | os.PathLike, ckpt_path: str | None = None) -> dict[str, Any]:
    """Extra arguments that make the logger ``target`` (a ``_target_`` class path) continue a resumed run.

    W&B: the run id of the first attempt.  TensorBoard: ``purge_step`` at the step of ``ckpt_path`` (0 when
    starting afresh), so TensorBoard hides what an interrupted attempt logged after it (the resumed run logs
    those steps again), also when that attempt died before its first checkpoint.
    """
    name = target.rsplit(".", 1)[-1]
    if name == "WandbLogger":
        return {"id": wandb_run_id(run_dir), "resume": "allow"}
    if name == "TensorBoardLogger":
        from potentials.training.checkpointing import checkpoint_step

        return {"purge_step": checkpoint_step(ckpt_path) if ckpt_path else 0}
    return {}
