"""Training end to end: overfitting, train.py → export → calculator → relax, and resuming from a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ase.build
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch_geometric.data import Batch

from potentials.calculator import PotentialCalculator
from potentials.conf import CONFIG_DIR
from potentials.datasets import emt
from potentials.graph import AtomicGraph
from potentials.models.egnn import EGNN
from potentials.potential import Potential
from potentials.training.loss import PotentialLoss
from potentials.training.run import register_resolvers, run

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = ["data.source.n_structures=24", "data.batch_size=4", "data.split.val=4", "data.split.test=4"]


def _config(tmp_path: Path, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"run_dir={tmp_path}", f"data_root={tmp_path / 'data'}", "logger=csv",
                                           "trainer.enable_progress_bar=false", "trainer.max_time=null",
                                           "model.channels=16", "model.num_layers=2", *SMALL_DATA, *overrides])


def test_overfits_a_few_frames():
    """Loss on four EMT frames falls by more than an order of magnitude."""
    torch.manual_seed(0)
    frames = emt.generate(seed=3, n_structures=4)
    graphs = Batch.from_data_list([AtomicGraph.from_atoms(a, 4.5) for a in frames])
    e0 = {z: -0.5 for z in graphs.z.unique().tolist()}
    potential = Potential(EGNN(cutoff=4.5, avg_num_neighbors=20, channels=32, num_layers=2), 4.5, e0, scale=0.5)
    loss_fn = PotentialLoss(energy_weight=1.0, forces_weight=10.0, stress_weight=0.0)
    opt = torch.optim.Adam(potential.parameters(), lr=5e-3)
    potential.train()
    losses = []
    for _ in range(250):
        opt.zero_grad()
        loss = loss_fn(potential(graphs, compute_stress=False), graphs)["total"]
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert min(losses[-10:]) < 0.1 * losses[0], (losses[0], losses[-10:])


def test_train_py_exports_a_model_that_relaxes(tmp_path):
    """`python train.py` → model.pt and metrics.json → `potentials relax` on a CIF (positions and cell)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"data_root={tmp_path / 'data'}",
           "logger=csv", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "model.channels=16",
           "model.num_layers=2", *SMALL_DATA]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported model" in proc.stdout and "demo relaxation" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/energy_mae", "test/force_mae", "test/force_rmse", "test/force_cos", "test/stress_mae"):
        assert np.isfinite(metrics["test"][key])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()

    calc = PotentialCalculator.from_file(run_dir / "model.pt", dtype="float64")
    assert set(calc.potential.elements) <= {29, 47, 79}
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = calc
    assert atoms.get_stress().shape == (6,) and np.isfinite(atoms.get_potential_energy())
    iron = ase.build.bulk("Fe")
    iron.calc = calc
    with pytest.raises(ValueError, match="never saw: Fe"):
        iron.get_potential_energy()

    cif = tmp_path / "cu.cif"
    ase.io.write(cif, atoms)
    out = tmp_path / "relaxed"
    proc = subprocess.run([sys.executable, "-m", "potentials.cli.main", "relax", str(run_dir / "model.pt"), str(cif),
                           "--cell", "--fmax", "0.05", "--steps", "200", "--out", str(out), "--format", "cif"],
                          capture_output=True, text=True, timeout=300)
    assert "cu" in proc.stdout and (out / "cu_relaxed.cif").is_file() and (out / "cu.traj").is_file(), proc.stderr
    relaxed = ase.io.read(out / "cu_relaxed.cif")
    relaxed.calc = calc
    fmax = np.abs(relaxed.get_forces()).max()
    assert proc.returncode == 0 and fmax < 0.06, (proc.stdout, fmax)


def test_resume_continues_from_last_checkpoint(tmp_path):
    """A run stopped after 2 epochs and rerun with a larger budget continues (same step count as one long run)."""
    cfg = _config(tmp_path, "trainer.max_epochs=2", "test=false", "demo_relax=false", "export=false")
    run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    steps_per_epoch = ckpt["global_step"] // 2
    assert ckpt["epoch"] == 1 and steps_per_epoch > 0
    cfg = _config(tmp_path, "trainer.max_epochs=3", "test=false", "demo_relax=false", "export=false")
    with open_dict(cfg):
        cfg.resume = "auto"
    run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 * steps_per_epoch
    assert "ema" in "".join(ckpt["state_dict"])  # EMA weights travel with the checkpoint


def test_summary_aligns_the_test_metrics(capsys):
    from potentials.training.report import print_summary

    print_summary({"run_dir": "outputs/x", "num_parameters": 1234,
                   "test": {"test/force_mae": 12.5, "test/energy_total_mae": 3.25, "test/ewt": 0.5, "epoch": 3}})
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and "mae" in line
            or line.strip().startswith("ewt")]
    assert len(rows) == 3
    assert len({row.index(".") for row in rows}) == 1  # the decimal points line up


def test_ema_update_and_fused_optimiser():
    """EMA ← d·EMA + (1 − d)·weights with d = min(ema_decay, (1 + steps)/(10 + steps)); AdamW runs fused."""
    from potentials.training.module import PotentialModule

    torch.manual_seed(0)
    module = PotentialModule(Potential(EGNN(cutoff=3.0, channels=8, num_layers=1), 3.0), PotentialLoss(),
                             scheduler="constant", ema_decay=0.9)
    before = [p.detach().clone() for p in module.ema.parameters()]
    with torch.no_grad():
        for p in module.potential.parameters():
            if p.requires_grad:  # what training changes; the EMA leaves fixed parameters alone
                p.add_(torch.randn_like(p))
    module._update_ema(steps=100)  # decay min(0.9, 101/110) = 0.9
    for e, b, p in zip(module.ema.parameters(), before, module.potential.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())
    before = [p.detach().clone() for p in module.ema.parameters()]
    module._update_ema(steps=2)  # warm-up: decay 3/12
    for e, b, p in zip(module.ema.parameters(), before, module.potential.parameters(), strict=True):
        torch.testing.assert_close(e, 0.25 * b + 0.75 * p.detach())
    optimizer = module.configure_optimizers()
    assert all(group["fused"] for group in optimizer.param_groups)
