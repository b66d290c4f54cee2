"""The autograd Hessian equals central differences of the forces for every model family, and is symmetric."""

from __future__ import annotations

import ase.build
import ase.units
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

import potentials
from potentials.calculator import PotentialCalculator
from potentials.potential import Potential
from potentials.properties import hessian
from tests.model_zoo import MODELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _structure() -> ase.Atoms:
    atoms = ase.build.bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    atoms.symbols[1] = "Ag"
    atoms.rattle(0.08, seed=3)
    return atoms


@pytest.mark.parametrize("family", sorted(MODELS))
def test_autograd_hessian_equals_differences_of_forces(family):
    torch.manual_seed(0)
    potential = Potential(MODELS[family](3.5), 3.5, {29: -1.0, 47: -2.0}, scale=20.0)
    calc = PotentialCalculator(potential, dtype="float64")
    atoms = _structure()
    exact = hessian(atoms, calc)
    assert exact.shape == (6, 6) and np.abs(exact).max() > 1e-2  # something to compare
    np.testing.assert_allclose(exact, exact.T, atol=1e-10)
    approx = hessian(atoms, calc, method="differences", delta=3e-5)
    # the differences converge to it as delta²: at this delta their error is below 1e-6 of the largest term
    np.testing.assert_allclose(exact, approx, atol=1e-6 * np.abs(exact).max())
    # selected rows are the same rows, and translations cost nothing (acoustic sum rule)
    np.testing.assert_allclose(hessian(atoms, calc, rows=[1]), exact[3:], atol=1e-12)
    np.testing.assert_allclose(exact.reshape(6, 2, 3).sum(axis=1), 0.0, atol=1e-9)


def test_any_calculator_falls_back_to_differences():
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    h = potentials.hessian(atoms, EMT())  # the package-level name
    assert h.shape == (12, 12)
    np.testing.assert_allclose(h, h.T, atol=1e-4)
    with pytest.raises(ValueError, match="PotentialCalculator"):
        hessian(atoms, EMT(), method="autograd")


def test_hessian_command_frequencies_equal_ase_vibrations(cu_model, tmp_path, capsys):
    """`potentials hessian` on a Cu4 cluster: the Hessian file is symmetric, and its harmonic frequencies equal those
    of ASE's finite-difference Vibrations driven by the same model (an independent route and unit conversion)."""
    import json

    import ase.io
    from ase.vibrations import Vibrations

    from potentials.cli.main import main

    cluster = ase.Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.17, 0], [1.25, 0.72, 2.04]])
    structure = tmp_path / "cu4.xyz"
    ase.io.write(structure, cluster)
    out = tmp_path / "hessian"
    assert main(["hessian", str(cu_model), str(structure), "--out", str(out)]) == 0
    record = json.loads((out / "hessian.json").read_text())
    hess = np.load(out / "hessian.npy")
    assert hess.shape == (12, 12) and record["max_asymmetry_eV_per_A2"] < 1e-8
    ours = np.array(record["frequencies_cm-1"])
    assert len(ours) == 12 and "imaginary modes" in capsys.readouterr().out

    cluster.calc = PotentialCalculator.from_file(cu_model, dtype="float64")
    vib = Vibrations(cluster, delta=1e-3, name=str(tmp_path / "vib"))
    vib.run()
    energies = vib.get_energies()  # eV, imaginary modes as imaginary numbers
    theirs = np.sort(np.where(np.abs(energies.imag) > 0, -np.abs(energies), energies.real)) / ase.units.invcm
    internal = np.abs(ours) > 20  # the six translations and rotations sit near zero in both
    assert internal.sum() == 6
    np.testing.assert_allclose(ours[internal], theirs[internal], rtol=2e-3)
