"""OC20's metrics on real OC20 frames: forces on free atoms only, energy MAE per structure, EwT and EFwT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from potentials import keys
from potentials.graph import AtomicGraph
from potentials.training.metrics import PotentialMetrics
from tests import oc20_samples as samples


@pytest.fixture(scope="module")
def batch(test_data):
    frames = samples.load_frames(test_data)
    return Batch.from_data_list([AtomicGraph.from_atoms(frames[k], 5.0, dtype=torch.float64) for k in (0, 20, 46)])


def _prediction(batch) -> dict[str, torch.Tensor]:
    """|ΔE| = 10, 50, 10 meV; force errors 10 meV/Å on free atoms, 1 eV/Å on fixed ones, 50 meV/Å on one free
    atom of the third structure: EwT 2/3 (structures 0 and 2), EFwT 1/3 (structure 0 only)."""
    energy = batch.energy + torch.tensor([0.01, -0.05, 0.01], dtype=torch.float64)
    delta = torch.full_like(batch.forces, 0.01)
    delta[batch.fixed] = 1.0
    third_free = torch.nonzero((batch.batch == 2) & ~batch.fixed)[0, 0]
    delta[third_free, 1] = -0.05
    return {keys.ENERGY: energy, keys.FORCES: batch.forces + delta}


def test_force_metrics_honour_free_atoms_only(batch):
    out = _prediction(batch)
    free, every = PotentialMetrics(free_atoms_only=True), PotentialMetrics(free_atoms_only=False)
    for metric in (free, every):
        metric.update(out, batch)
    n_free = int((~batch.fixed).sum())
    assert n_free == 21 and int(batch.fixed.sum()) == 30
    expected_free = (0.01 * (3 * n_free - 1) + 0.05) / (3 * n_free) * 1e3
    assert free.compute()["force_mae"] == pytest.approx(expected_free, rel=1e-9)
    expected_every = (0.01 * (3 * n_free - 1) + 0.05 + 1.0 * 90) / (3 * 51) * 1e3
    assert every.compute()["force_mae"] == pytest.approx(expected_every, rel=1e-9)


@pytest.mark.parametrize("free_atoms_only", [True, False])
def test_energy_mae_per_structure_ewt_and_efwt(batch, free_atoms_only):
    metric = PotentialMetrics(free_atoms_only=free_atoms_only)
    out = _prediction(batch)
    metric.update(out, batch)
    values = metric.compute()
    assert values["energy_total_mae"] == pytest.approx(70.0 / 3, rel=1e-9)  # meV per structure
    assert values["energy_mae"] == pytest.approx(np.mean([10 / 17, 50 / 17, 10 / 17]), rel=1e-9)  # meV/atom
    assert values["ewt"] == pytest.approx(2 / 3) and values["efwt"] == pytest.approx(1 / 3)  # fixed atoms never count
    metric.reset()
    metric.update({keys.ENERGY: out[keys.ENERGY], keys.FORCES: batch.forces.clone()}, batch)
    assert metric.compute()["efwt"] == pytest.approx(2 / 3)  # exact forces: EFwT = EwT


def test_efwt_needs_energy_and_forces(batch):
    metric = PotentialMetrics()
    no_forces = batch.clone()
    no_forces.has_forces = torch.zeros_like(no_forces.has_forces)
    metric.update(_prediction(batch), no_forces)
    values = metric.compute()
    assert "efwt" not in values and values["ewt"] == pytest.approx(2 / 3)
