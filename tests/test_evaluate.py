"""`potentials evaluate`: metrics against hand-computed values, batching, the data formats and free atoms only."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase import units

from potentials.calculator import PotentialCalculator
from potentials.cli.main import main
from potentials.datasets import emt
from potentials.evaluate import Predictions, compute_metrics, evaluate_file, predict, to_graphs
from potentials.export import load
from tests.tiny_model import random_model

FIGURES = ("energy_parity", "force_parity", "force_error_hist", "force_error_per_element")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def frames():
    """Seven EMT Cu structures (bulk, slabs, vacancies) with energy, forces and, for bulk, stress."""
    return emt.generate(seed=9, n_structures=7, elements=("Cu",))


def _predictions() -> Predictions:
    nan33 = np.full((3, 3), np.nan)
    s0_ref, s0_pred = np.zeros((3, 3)), np.diag([1.0, 2.0, -3.0]) * units.GPa
    return Predictions(
        num_atoms=np.array([2, 1]), energy_ref=np.array([1.0, 0.0]), energy_pred=np.array([1.1, -0.02]),
        stress_ref=np.stack([s0_ref, nan33]), stress_pred=np.stack([s0_pred, nan33]),
        has_energy=np.array([True, True]), has_forces=np.array([True, True]), has_stress=np.array([True, False]),
        z=np.array([29, 8, 29]), structure=np.array([0, 0, 1]), fixed=np.array([False, True, False]),
        forces_ref=np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0]]),
        forces_pred=np.array([[1.0, 0.3, 0], [0, -1.0, 0], [0, 0, 2.0]]),
    )


def test_metrics_by_hand():
    m = compute_metrics(_predictions())
    assert m["energy_mae"] == pytest.approx((50 + 20) / 2)  # |0.1 eV|/2 atoms, |0.02 eV|/1 atom, in meV/atom
    assert m["energy_rmse"] == pytest.approx(np.sqrt((50**2 + 20**2) / 2))
    assert m["force_mae"] == pytest.approx((300 + 2000) / 9)  # over the 9 components, meV/Å
    assert m["force_rmse"] == pytest.approx(np.sqrt((300**2 + 2000**2) / 9))
    assert m["force_cos"] == pytest.approx((1 / np.sqrt(1.09) - 1 + 1) / 3)
    assert m["stress_mae"] == pytest.approx(6 / 9) and m["n_stress"] == 1  # GPa, the labelled structure only
    assert m["per_element"]["O"] == {"n_atoms": 1, "force_mae": pytest.approx(2000 / 3),
                                     "force_rmse": pytest.approx(np.sqrt(2000**2 / 3))}
    assert m["per_element"]["Cu"]["n_atoms"] == 2 and m["per_element"]["Cu"]["force_mae"] == pytest.approx(50)
    free = compute_metrics(_predictions(), free_atoms_only=True)  # the fixed O atom leaves the force metrics
    assert free["n_force_atoms"] == 2 and free["force_mae"] == pytest.approx(50) and "O" not in free["per_element"]
    assert free["energy_mae"] == m["energy_mae"]


def test_batched_predictions_equal_the_calculator(cu_model, frames):
    potential = load(cu_model, dtype="float64")
    graphs = to_graphs(frames, potential, potential.scale.dtype)
    pred = predict(potential, graphs, batch_size=3)
    calc = PotentialCalculator(potential, dtype="float64")
    start = 0
    for k, atoms in enumerate(frames):
        atoms = atoms.copy()
        atoms.calc = calc
        n = len(atoms)
        assert pred.energy_pred[k] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(pred.forces_pred[start:start + n], atoms.get_forces(), atol=1e-9)
        assert (pred.structure[start:start + n] == k).all()
        if atoms.pbc.all():
            np.testing.assert_allclose(pred.stress_pred[k].ravel()[[0, 4, 8, 5, 2, 1]], atoms.get_stress(), atol=1e-9)
        start += n
    assert start == len(pred.z) and pred.has_stress.sum() == sum(a.pbc.all() for a in frames)


def test_evaluate_command_on_extxyz(cu_model, frames, tmp_path, capsys):
    data = tmp_path / "cu.extxyz"
    ase.io.write(data, frames)
    out = tmp_path / "eval"
    assert main(["evaluate", str(cu_model), str(data), "--out", str(out), "--dtype", "float64", "--batch-size", "4",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "force errors per element" in printed and "Cu" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_structures"] == 7 and metrics["n_atoms"] == sum(len(a) for a in frames)
    calc = PotentialCalculator.from_file(cu_model, dtype="float64")
    errors = []
    for atoms in frames:
        copy = atoms.copy()
        copy.calc = calc
        errors.append(abs(copy.get_potential_energy() - atoms.get_potential_energy()) / len(atoms))
    assert metrics["energy_mae"] == pytest.approx(np.mean(errors) * 1e3, rel=1e-6)
    assert {"force_mae", "force_rmse", "force_cos", "stress_mae"} <= set(metrics)
    assert metrics["per_element"]["Cu"]["force_mae"] == pytest.approx(metrics["force_mae"])
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 5000, name
    saved = np.load(out / "predictions.npz")
    assert saved["forces_pred"].shape == (metrics["n_atoms"], 3)


def test_md17_npz_and_kcal_per_mol_extxyz(test_data, cu_model, tmp_path, capsys):
    """The .npz goes to the MD17 adapter (kcal/mol → eV); an extxyz in kcal/mol is converted with --energy-unit."""
    hco = random_model(tmp_path / "hco.pt", ["H", "C", "O"])
    out = tmp_path / "md17"
    npz = test_data / "md17" / "md17_ethanol_first2000.npz"
    assert main(["evaluate", str(hco), str(npz), "--index", ":12", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_structures"] == 12 and metrics["n_atoms"] == 108 and metrics["n_stress"] == 0
    assert "stress_mae" not in metrics and set(metrics["per_element"]) == {"H", "C", "O"}
    raw = np.load(npz)
    energy = np.load(out / "predictions.npz")["energy_ref"]
    np.testing.assert_allclose(energy, raw["E"][:12, 0] * units.kcal / units.mol)

    xyz = test_data / "rmd17" / "rmd17_ethanol_reduced_100.xyz"
    assert main(["evaluate", str(hco), str(xyz), "--index", "::25", "--energy-unit", "kcal/mol",
                 "--out", str(tmp_path / "rmd17"), "--no-progress"]) == 0
    energy = np.load(tmp_path / "rmd17" / "predictions.npz")["energy_ref"]
    assert len(energy) == 4 and np.all((energy > -4220) & (energy < -4200))  # about -97,070 kcal/mol in eV

    capsys.readouterr()
    args = ["evaluate", str(cu_model), str(npz), "--index", ":2", "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(args) == 2
    assert "frame 0: contains elements the model never saw: H, C, O (trained on: Cu)" in capsys.readouterr().err


def test_free_atoms_only_on_an_oc20_relaxation(test_data, tmp_path):
    """OC20 slab: 10 of 17 atoms are fixed; --free-atoms-only scores the other 7 only."""
    model = random_model(tmp_path / "orb.pt", ["O", "Rb"])
    traj = test_data / "oc20" / "oc20_is2res_random1447590.traj"
    counts = {}
    for flag in ([], ["--free-atoms-only"]):
        out = tmp_path / ("free" if flag else "all")
        assert main(["evaluate", str(model), str(traj), "--index", ":3", "--out", str(out), "--no-progress",
                     *flag]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        counts[bool(flag)] = metrics["n_force_atoms"]
        assert metrics["free_atoms_only"] is bool(flag)
    assert counts == {False: 3 * 17, True: 3 * 7}
    hco = random_model(tmp_path / "hco.pt", ["H", "C", "O"])
    with pytest.raises(ValueError, match="no atom is fixed"):
        evaluate_file(hco, test_data / "rmd17" / "rmd17_ethanol_reduced_100.xyz", tmp_path / "y",
                      free_atoms_only=True, index=":2", energy_unit="kcal/mol")
