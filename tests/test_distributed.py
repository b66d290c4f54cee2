"""Data-parallel training (Lightning DDP, 2 CPU processes on gloo) against one process with the same global batch.

The training split has 13 structures and the global batch 4, so the last batch of every epoch is uneven (one
structure: the second process trains on a padding copy without labels) and the 5 validation structures do not
split evenly either. Every launcher must give the same optimiser steps, weights, EMA and logged metrics as one
process, in float64, to rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch_geometric.data import Batch

from potentials.datasets import emt
from potentials.errors import PotentialsInputError
from potentials.graph import AtomicGraph
from potentials.models.egnn import EGNN
from potentials.potential import Potential
from potentials.training.launch import external_launch_overrides
from potentials.training.loss import PotentialLoss
from potentials.training.run import run
from tests.train_config import train_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
CLI = str(Path(sys.executable).with_name("potentials"))  # the installed `potentials` command
SETTINGS = ["logger=csv", "trainer.max_epochs=2", "trainer.max_time=null", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "model.channels=8",
            "model.num_layers=1", "data.source.n_structures=22", "data.split.val=5", "data.split.test=4",
            "dtype=float64", "demo_relax=false", "figures=false", "export=false", "checkpoint.every_n_minutes=null"]
TWO_PROCESSES = ["data.batch_size=2", "data.eval_batch_size=2", "trainer=ddp", "trainer.devices=2",
                 "trainer.accelerator=cpu"]
TIMEOUT = 180


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_root) -> Path:
    """The reference: one process, batch 4, trained in this process."""
    run_dir = tmp_path_factory.mktemp("single")
    run(train_config(run_dir, data_root, *SETTINGS, "data.batch_size=4", "data.eval_batch_size=4"))
    return run_dir


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(run_dir: Path) -> pd.Series:
    frame = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return frame.dropna(subset=["train/loss_step"]).set_index("step")["train/loss_step"]


def _epochs(run_dir: Path, prefix: str) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "csv" / "metrics.csv")
    columns = [c for c in frame.columns if c.startswith(prefix)]
    return frame.dropna(subset=[f"{prefix}force_mae"])[columns].reset_index(drop=True)


def _assert_same_training(run_dir: Path, single: Path) -> None:
    """Same per-step losses, validation metrics every epoch, test metrics and final weights (EMA included)."""
    steps, reference = _steps(run_dir), _steps(single)
    assert list(steps.index) == list(reference.index) == list(range(8))
    torch.testing.assert_close(torch.tensor(steps.values), torch.tensor(reference.values), rtol=1e-9, atol=0)
    for prefix in ("val/", "test/"):
        theirs, ours = _epochs(run_dir, prefix), _epochs(single, prefix)
        assert len(ours) == (2 if prefix == "val/" else 1) and list(theirs.columns) == list(ours.columns)
        torch.testing.assert_close(torch.tensor(theirs.values), torch.tensor(ours.values), rtol=1e-9, atol=1e-12)
    a = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(single / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    assert any(k.startswith("ema.") for k in a["state_dict"])
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_loss_is_normalised_over_the_global_batch():
    """Per-process losses over global counts, averaged like DDP averages gradients, give the global gradient."""
    torch.manual_seed(0)
    frames = emt.generate(seed=1, n_structures=5)
    graphs = [AtomicGraph.from_atoms(a, 4.0, dtype=torch.float64) for a in frames]
    potential = Potential(EGNN(cutoff=4.0, avg_num_neighbors=10, channels=8, num_layers=1), 4.0,
                          {29: -3.0, 47: -2.5, 79: -3.2}).double()
    loss_fn = PotentialLoss(energy_weight=1.0, forces_weight=10.0, stress_weight=1.0)

    params = [p for p in potential.parameters() if p.requires_grad]

    def grads(loss: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    def out(batch: Batch) -> dict[str, torch.Tensor]:
        return potential(batch, create_graph=True)

    full = Batch.from_data_list(graphs)
    reference = grads(loss_fn(out(full), full)["total"])
    halves = [Batch.from_data_list(graphs[:3]), Batch.from_data_list(graphs[3:])]  # uneven: 3 + 2 structures
    terms = [loss_fn.terms(out(b), b) for b in halves]
    global_counts = {k: sum(t[k][1] for t in terms) / 2 for k in terms[0]}
    averaged = sum(grads(loss_fn.combine(t, global_counts)["total"]) for t in terms) / 2
    torch.testing.assert_close(averaged, reference, rtol=1e-10, atol=1e-12)
    naive = sum(grads(loss_fn.combine(t)["total"]) for t in terms) / 2  # per-process means: not the same
    assert not torch.allclose(naive, reference, rtol=1e-3)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, data_root, single):
    """`potentials train trainer=ddp trainer.devices=2` (Lightning reruns the command for the second process) with
    batch 2 == 1 × batch 4."""
    run_dir, ranks = tmp_path / "ddp", tmp_path / "ranks"
    cmd = [CLI, "train", f"hydra.run.dir={run_dir}", f"data_root={data_root}", *SETTINGS, *TWO_PROCESSES,
           "+callbacks.ranks._target_=tests.rank_state.SaveRankState", f"+callbacks.ranks.folder={ranks}"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # `tests` for the callback
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(PYTHONPATH=path),
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_training(run_dir, single)
    rank0, rank1 = (torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.startswith("ema.") for k in rank0)
    for key in rank0:  # weights and EMA identical, bit for bit, on both processes
        assert torch.equal(rank0[key], rank1[key]), key
    assert proc.stdout.count("Training finished") == 1  # rank 0 reports
    metrics = json.loads((run_dir / "metrics.json").read_text())
    reference = json.loads((single / "metrics.json").read_text())
    for key, value in reference["test"].items():
        assert metrics["test"][key] == pytest.approx(value, rel=1e-9), key


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_externally_launched_processes_match_one_process(launcher, tmp_path, data_root, single):
    """torchrun, and srun as SLURM sets it up (SLURM_* variables, Lightning's SLURMEnvironment), start both ranks."""
    run_dir = tmp_path / launcher
    args = [TRAIN, f"hydra.run.dir={run_dir}", f"data_root={data_root}", *SETTINGS, *TWO_PROCESSES]
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={port}", *args]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                  env=_env())]
    else:
        slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_NODEID="0",
                     SLURM_JOB_ID="4242", SLURM_JOB_NAME="potentials", SLURM_NODELIST="127.0.0.1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=tmp_path, env=_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
                 for r in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "MEMBER: 2/2" in "".join(err for _, err in outputs)  # one process group (steps: see below)
    assert (run_dir / "train_rank1.log").is_file()  # rank 1 ran with its own Hydra job name
    _assert_same_training(run_dir, single)


def test_external_launch_needs_one_run_directory():
    """torchrun/srun start every process alone: without hydra.run.dir each would pick its own timestamped folder."""
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    with pytest.raises(PotentialsInputError, match="hydra.run.dir"):
        external_launch_overrides(["trainer=ddp"], torchrun)
    assert external_launch_overrides(["hydra.run.dir=x"], torchrun) == [
        "hydra.output_subdir=null", "hydra.job.name=train_rank1"]
    assert external_launch_overrides(["hydra.run.dir=x"], {**torchrun, "RANK": "0"}) == []
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "3"}
    assert external_launch_overrides(["hydra.run.dir=x"], slurm)[-1] == "hydra.job.name=train_rank3"
    assert external_launch_overrides([], {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == []  # one task: nothing
    lightning_child = ["hydra.run.dir=x", "hydra.output_subdir=null"]
    assert external_launch_overrides(lightning_child, torchrun) == []
