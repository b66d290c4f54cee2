"""The autograd Hessian equals central differences of the forces for every model family, and is symmetric."""

from __future__ import annotations

import ase.build
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
