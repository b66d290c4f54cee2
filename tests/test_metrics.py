"""One definition of each metric: training's epoch accumulator and ``potentials evaluate`` report the same values,
keys and units for the same predictions, however the structures are batched."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase.units import GPa

from potentials import keys
from potentials import metrics as definitions
from potentials.evaluate import UNITS as EVALUATE_UNITS
from potentials.evaluate import Predictions, compute_metrics
from potentials.training.metrics import UNITS as TRAINING_UNITS
from potentials.training.metrics import PotentialMetrics

NUM_ATOMS = np.array([3, 4, 2, 5, 3, 1])


def _predictions() -> Predictions:
    """Six structures, one without energy, one without forces, two without stress, some atoms fixed."""
    rng = np.random.default_rng(1)
    b, n = len(NUM_ATOMS), int(NUM_ATOMS.sum())
    stress_pred = rng.normal(size=(b, 3, 3)) * 0.01
    stress_pred[4] = np.nan  # not computed: left out although labelled
    pred = Predictions(
        num_atoms=NUM_ATOMS, energy_ref=rng.normal(size=b), energy_pred=rng.normal(size=b),
        stress_ref=rng.normal(size=(b, 3, 3)) * 0.01, stress_pred=stress_pred,
        has_energy=np.array([1, 1, 0, 1, 1, 1], bool), has_forces=np.array([1, 0, 1, 1, 1, 1], bool),
        has_stress=np.array([1, 1, 1, 0, 1, 0], bool), z=rng.choice([1, 6, 8, 29], n),
        structure=np.repeat(np.arange(b), NUM_ATOMS), fixed=rng.random(n) < 0.3,
        forces_ref=rng.normal(size=(n, 3)), forces_pred=rng.normal(size=(n, 3)))
    pred.energy_ref[2] = np.nan
    pred.energy_pred[0] = pred.energy_ref[0] + 0.01  # within EwT's 20 meV
    return pred


def _batch(pred: Predictions, structures: list[int]) -> tuple[dict[str, torch.Tensor], SimpleNamespace]:
    """Model output and labelled batch of some structures, as training sees them."""
    atoms = np.isin(pred.structure, structures)
    t = torch.as_tensor
    batch = SimpleNamespace(
        has_energy=t(pred.has_energy[structures]), has_forces=t(pred.has_forces[structures]),
        has_stress=t(pred.has_stress[structures]), energy=t(pred.energy_ref[structures]),
        num_atoms=t(pred.num_atoms[structures]), stress=t(pred.stress_ref[structures]),
        batch=t(np.searchsorted(structures, pred.structure[atoms])), fixed=t(pred.fixed[atoms]),
        forces=t(pred.forces_ref[atoms]))
    out = {keys.ENERGY: t(pred.energy_pred[structures]), keys.FORCES: t(pred.forces_pred[atoms]),
           keys.STRESS: t(pred.stress_pred[structures])}
    return out, batch


@pytest.mark.parametrize("free_atoms_only", [False, True])
@pytest.mark.parametrize("split", [[[0, 1, 2, 3, 4, 5]], [[0, 1], [2, 3, 4], [5]]], ids=["one", "three"])
def test_training_and_evaluation_report_the_same_values(free_atoms_only, split):
    pred = _predictions()
    evaluated = compute_metrics(pred, free_atoms_only)
    metric = PotentialMetrics(free_atoms_only=free_atoms_only)
    for structures in split:
        metric.update(*_batch(pred, structures))
    trained = metric.compute()
    shared = set(trained) & set(evaluated)
    assert shared == {"energy_mae", "force_mae", "force_rmse", "force_cos", "stress_mae"}
    for name in shared:
        assert trained[name] == pytest.approx(evaluated[name], rel=1e-12, abs=1e-15), name
    # by hand: energy per atom over the 5 labelled structures, stress over the 3 labelled, finite ones
    e = pred.has_energy
    expected = np.abs((pred.energy_pred[e] - pred.energy_ref[e]) / pred.num_atoms[e]).mean() * 1e3
    assert evaluated["energy_mae"] == pytest.approx(expected, rel=1e-12)
    assert evaluated["n_stress"] == 3
    assert evaluated["stress_mae"] == pytest.approx(np.abs(pred.stress_pred[:3] - pred.stress_ref[:3]).mean() / GPa)
    assert trained["ewt"] == pytest.approx(1 / 5)  # structure 0 only


def test_reported_keys_and_units_are_fixed():
    m = compute_metrics(_predictions())
    assert list(m) == ["n_structures", "n_atoms", "n_energy", "energy_mae", "energy_rmse", "n_force_atoms",
                       "force_mae", "force_rmse", "force_cos", "per_element", "n_stress", "stress_mae", "stress_rmse",
                       "free_atoms_only", "units"]
    assert m["units"] == EVALUATE_UNITS == {
        "energy_mae": "meV/atom", "energy_rmse": "meV/atom", "force_mae": "meV/Å", "force_rmse": "meV/Å",
        "force_cos": "", "stress_mae": "GPa", "stress_rmse": "GPa"}
    assert TRAINING_UNITS == {"energy_mae": "meV/atom", "force_mae": "meV/Å", "force_rmse": "meV/Å",
                              "force_cos": "", "stress_mae": "GPa", "energy_total_mae": "meV", "ewt": "", "efwt": ""}
    assert set(definitions.UNITS) == set(EVALUATE_UNITS) | set(TRAINING_UNITS)


def test_a_metric_without_items_is_left_out():
    assert definitions.metrics_of(definitions.force_terms(torch.zeros(0, 3), torch.zeros(0, 3))) == {}
    terms = definitions.force_terms(torch.tensor([[0.0, 0.003, 0.0]]), torch.tensor([[0.0, 0.0, 0.004]]))
    values = definitions.metrics_of(terms)
    assert values == pytest.approx({"force_mae": 7 / 3, "force_rmse": (25 / 3) ** 0.5, "force_cos": 0.0})
