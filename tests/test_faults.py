"""Surviving faults: a `train.py` killed with SIGKILL (also in the middle of a checkpoint write) is rerun with the
same command and ends exactly where an uninterrupted run ends; checkpoint files are never half written; the CSV,
W&B and TensorBoard loggers continue the same records; the same seed gives the same loss curve."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import wandb

from potentials.errors import PotentialsInputError
from potentials.training import checkpointing
from potentials.training.checkpointing import (
    AtomicCheckpointIO,
    checkpoint_step,
    remove_stale_temporaries,
    resume_path,
)
from potentials.training.loggers import CSVLogger, resuming_logger_kwargs
from potentials.training.run import run
from tests.train_config import train_config

ROOT = Path(__file__).resolve().parents[1]
# 13 training structures in batches of 2: 7 optimiser steps per epoch, 21 in all; last.ckpt every 2 steps
SETTINGS = ["logger=csv", "trainer.max_epochs=3", "trainer.max_time=null", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "model.channels=8",
            "model.num_layers=1", "data.source.n_structures=22", "data.split.val=5", "data.split.test=4",
            "data.batch_size=2", "dtype=float64", "demo_relax=false", "figures=false", "export=false", "test=false",
            "checkpoint.every_n_train_steps=2"]
TOTAL_STEPS = 21


def _config(run_dir: Path, data_root: Path, *overrides: str):
    return train_config(run_dir, data_root, *SETTINGS, *overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run(_config(run_dir, data_root))
    return run_dir


def _command(run_dir: Path, data_root: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"data_root={data_root}", *SETTINGS]


def _start(run_dir: Path, data_root: Path, pause: float = 0.0) -> subprocess.Popen:
    """Start the run; writes over an existing checkpoint wait ``pause`` seconds before the rename."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = f"trainer.plugins=[{{_target_:tests.fault_injection.FaultyCheckpointIO,pause:{pause}}}]"
    return subprocess.Popen([*_command(run_dir, data_root), writer], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def _finish_and_compare(run_dir: Path, data_root: Path, uninterrupted: Path) -> None:
    """Rerun the same command: it resumes and ends with the uninterrupted run's steps, weights and CSV rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_command(run_dir, data_root), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout + proc.stderr
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the interrupted write was cleaned up
    ours = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    theirs = torch.load(uninterrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ours["global_step"] == theirs["global_step"] == TOTAL_STEPS
    for key, value in theirs["state_dict"].items():  # the same batches in the same order: the same weights, exactly
        assert torch.equal(ours["state_dict"][key], value), key
    rows = pd.read_csv(run_dir / "csv" / "metrics.csv").dropna(subset=["train/loss_step"])
    reference = pd.read_csv(uninterrupted / "csv" / "metrics.csv").dropna(subset=["train/loss_step"])
    assert list(rows["step"]) == list(reference["step"]) == list(range(TOTAL_STEPS))  # none lost, none twice
    assert list(rows["train/loss_step"]) == list(reference["train/loss_step"])


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(tmp_path, data_root, uninterrupted):
    """SIGKILL while last.ckpt is being replaced (the temporary file is written, not yet renamed)."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(run_dir, data_root, pause=60.0)  # writes over an existing checkpoint wait 60 s before the rename
    _wait_for(lambda: last.is_file() and list(last.parent.glob(".last.ckpt.*.tmp")), proc)
    _kill(proc)
    assert list(last.parent.glob(".last.ckpt.*.tmp"))  # killed mid-write ...
    assert checkpoint_step(last) == 2  # ... and the previous checkpoint is whole
    _finish_and_compare(run_dir, data_root, uninterrupted)


@pytest.mark.parametrize("row_written", [True, False], ids=["row-written", "row-not-written"])
def test_kill_between_checkpoints_mid_epoch_resumes_without_losing_steps(tmp_path, data_root, uninterrupted,
                                                                         row_written):
    """SIGKILL while training, right after the second mid-epoch checkpoint (step 4 of 7 in the first epoch).

    Lightning writes the row of step 3 just after that checkpoint; ``row-not-written`` removes it from
    ``metrics.csv``, as a kill in the instant between the two leaves it, and the resumed run must put it back."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(run_dir, data_root, pause=1.0)  # slow checkpoint writes so that training outlives the polling
    _wait_for(last.is_file, proc)
    first = last.stat().st_mtime_ns
    _wait_for(lambda: last.stat().st_mtime_ns != first, proc)
    _kill(proc)
    assert checkpoint_step(last) == 4
    metrics = run_dir / "csv" / "metrics.csv"
    frame = pd.read_csv(metrics)
    if not row_written:
        frame = frame[~((frame["step"] == 3) & frame["train/loss_step"].notna())]
        frame.to_csv(metrics, index=False)
        assert 3 not in frame.dropna(subset=["train/loss_step"])["step"].tolist()
    _finish_and_compare(run_dir, data_root, uninterrupted)


def test_same_seed_same_loss_curve(tmp_path, data_root):
    """Two runs with one seed log identical training losses at every step (CPU)."""
    curves = []
    for name in ("a", "b"):
        run(_config(tmp_path / name, data_root, "trainer.max_epochs=1", "checkpoint.every_n_train_steps=null"))
        frame = pd.read_csv(tmp_path / name / "csv" / "metrics.csv")
        curves.append(frame.dropna(subset=["train/loss_step"])["train/loss_step"].tolist())
    assert len(curves[0]) == 7 and curves[0] == curves[1]
    run(_config(tmp_path / "c", data_root, "trainer.max_epochs=1", "checkpoint.every_n_train_steps=null", "seed=1"))
    other = pd.read_csv(tmp_path / "c" / "csv" / "metrics.csv").dropna(subset=["train/loss_step"])
    assert other["train/loss_step"].tolist() != curves[0]  # the seed matters, so the comparison can fail


def test_wandb_run_continues_with_the_same_id(tmp_path, data_root, monkeypatch):
    """A resumed run logs to the W&B run of the first attempt (its id is kept in the run directory)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for epochs in (1, 2):
        run(_config(tmp_path, data_root, "logger=wandb", "logger.name=resume", f"trainer.max_epochs={epochs}",
                    "checkpoint.every_n_train_steps=null"))
        wandb.finish()  # as when train.py exits
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # W&B names a run folder offline-run-<time>-<id>, adding -1 when both attempts start within one second
    pattern = rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?"
    assert len(run_id) == 8 and len(runs) == 2 and all(re.fullmatch(pattern, r.name) for r in runs), runs
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 14  # the second run resumed, not restarted


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous file untouched and no temporary behind."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    umask = os.umask(0)
    os.umask(umask)
    # mode as open() makes it, not mkstemp's 0600
    assert checkpoint_step(path) == 1 and path.stat().st_mode & 0o777 == 0o666 & ~umask

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2}, path)
    assert checkpoint_step(path) == 1 and not list(tmp_path.glob(".*.tmp"))


def test_resume_path_picks_the_newest_complete_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert resume_path("auto", tmp_path) is None
    torch.save({"global_step": 3}, ckpts / "last.ckpt")
    assert resume_path("auto", tmp_path) == str(ckpts / "last.ckpt")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:100])  # cut short
    assert resume_path("auto", tmp_path) == str(ckpts / "last.ckpt")  # the truncated one is ignored
    time.sleep(0.01)
    torch.save({"global_step": 5}, tmp_path / "hpc_ckpt_2.ckpt")  # SLURM's pre-emption checkpoint, newer
    assert resume_path("auto", tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")
    assert resume_path("never", tmp_path) is None
    with pytest.raises(PotentialsInputError, match="truncated"):
        resume_path(str(tmp_path / "hpc_ckpt_1.ckpt"), tmp_path)
    with pytest.raises(PotentialsInputError, match="no checkpoint file"):
        resume_path(str(tmp_path / "missing.ckpt"), tmp_path)
    (ckpts / ".last.ckpt.123-abc.tmp").write_bytes(b"partial")
    assert remove_stale_temporaries(ckpts) == [ckpts / ".last.ckpt.123-abc.tmp"]
    assert (ckpts / "last.ckpt").is_file()


def test_csv_logger_continues_and_drops_rows_logged_after_the_checkpoint(tmp_path):
    """Rows of steps the resumed run redoes are replaced; earlier rows and a row cut short by the kill are handled."""
    logger = CSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        logger.log_metrics({"train/loss_step": float(step)}, step=step)
    logger.log_metrics({"val/force_mae": 9.0}, step=3)
    logger.save()
    path = tmp_path / "csv" / "metrics.csv"
    with open(path, "a") as f:
        f.write("0.5,")  # a row the kill cut short
    resumed = CSVLogger(tmp_path, name="csv", version="")  # the checkpoint was taken after step 3
    resumed.log_metrics({"train/loss_step": 30.0}, step=4)
    resumed.log_metrics({"train/loss_step": 40.0}, step=5)
    resumed.save()
    with open(path, newline="") as f:
        rows = [(int(r["step"]), r["train/loss_step"], r["val/force_mae"]) for r in csv.DictReader(f)]
    assert rows == [(0, "0.0", ""), (1, "1.0", ""), (2, "2.0", ""), (3, "3.0", ""), (3, "", "9.0"),
                    (4, "30.0", ""), (5, "40.0", "")]


def test_tensorboard_hides_what_an_interrupted_attempt_logged_after_the_checkpoint(tmp_path, data_root):
    """Resuming from an older checkpoint than the last logged step: TensorBoard shows every step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def attempt(epochs: int) -> None:
        run(_config(tmp_path, data_root, "logger=tensorboard", f"trainer.max_epochs={epochs}",
                    "checkpoint.every_n_train_steps=null"))

    attempt(1)  # checkpoint at step 7
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    at_step_7 = ckpt.read_bytes()
    attempt(2)  # steps 7 … 13 logged, checkpoint at step 14
    ckpt.write_bytes(at_step_7)  # as if the attempt had been killed after logging them, before its checkpoint
    attempt(2)  # resumes at step 7 and logs steps 7 … 13 again
    assert checkpoint_step(ckpt) == 14
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss_step")]
    assert sorted(steps) == list(range(14)), steps  # without purge_step, steps 7 … 13 appear twice
    # an attempt killed before its first checkpoint: the fresh start purges from step 0
    assert resuming_logger_kwargs("lightning.pytorch.loggers.TensorBoardLogger", tmp_path) == {"purge_step": 0}
