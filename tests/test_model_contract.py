"""The contract every model family must pass (float64), through Potential and the ASE calculator.

On the device ``POTENTIALS_TEST_DEVICE`` names (default cpu; scripts/gpu_check.sh runs it with cuda).
"""

from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase.calculators.test import gradient_test
from ase.filters import FrechetCellFilter
from scipy.spatial.transform import Rotation
from torch_geometric.data import Batch

from potentials.calculator import PotentialCalculator
from potentials.graph import AtomicGraph
from potentials.models.base import EnergyModel
from potentials.potential import Potential
from tests.conftest import TEST_DEVICE
from tests.model_zoo import MODELS

CUTOFF = 4.0
E0 = {13: -3.1, 29: -1.2, 47: -0.7, 8: -4.0, 1: -1.5, 6: -2.0}


@pytest.fixture(params=sorted(MODELS), scope="module")
def potential(request) -> Potential:
    torch.manual_seed(0)
    model = MODELS[request.param](CUTOFF)
    # random but non-trivial scale/shift exercise the wrapper
    return Potential(model, CUTOFF, atomic_energies=E0, scale=1.7, shift=0.3).double().to(TEST_DEVICE).eval()


def test_states_the_contract(potential):
    """Every family is an EnergyModel: the cutoff it was built for, a fixed direct_forces, its config record."""
    model = potential.model
    assert isinstance(model, EnergyModel)
    assert model.cutoff == CUTOFF and model.direct_forces is False
    assert isinstance(model.resolved_config(), dict)


def _bulk(seed: int = 0) -> ase.Atoms:
    """A triclinic CuAl alloy cell, rattled (periodic in all directions)."""
    rng = np.random.default_rng(seed)
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[[1, 3]] = 13
    atoms.set_cell(atoms.cell.array + rng.normal(0, 0.15, (3, 3)), scale_atoms=True)
    atoms.positions += rng.normal(0, 0.12, atoms.positions.shape)
    return atoms


def _molecule() -> ase.Atoms:
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.positions += np.random.default_rng(1).normal(0, 0.05, atoms.positions.shape)
    return atoms


def _slab() -> ase.Atoms:
    atoms = ase.build.fcc111("Cu", size=(2, 2, 2), vacuum=5.0, a=3.7)
    ase.build.add_adsorbate(atoms, "O", 1.5, "fcc")
    atoms.positions += np.random.default_rng(2).normal(0, 0.05, atoms.positions.shape)
    return atoms


def _evaluate(potential: Potential, *structures: ase.Atoms, stress: bool = True) -> dict:
    batch = Batch.from_data_list([AtomicGraph.from_atoms(a, CUTOFF, dtype=torch.float64) for a in structures])
    out = potential(batch.to(TEST_DEVICE), compute_forces=True, compute_stress=stress)
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def _rotated(atoms: ase.Atoms, rot: np.ndarray) -> ase.Atoms:
    out = atoms.copy()
    out.positions = atoms.positions @ rot.T
    if atoms.pbc.any():
        out.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
    return out


@pytest.mark.parametrize("make", [_bulk, _molecule, _slab], ids=["bulk", "molecule", "slab"])
def test_rotation_equivariance(potential, make):
    atoms = make()
    ref = _evaluate(potential, atoms)
    for seed in range(3):
        rot = Rotation.random(random_state=seed).as_matrix()
        out = _evaluate(potential, _rotated(atoms, rot))
        np.testing.assert_allclose(out["energy"], ref["energy"], rtol=1e-9, atol=1e-9)
        scale_f = np.abs(ref["forces"]).max()
        np.testing.assert_allclose(out["forces"], ref["forces"] @ rot.T, atol=1e-4 * scale_f)
        if atoms.pbc.all():
            expected = rot @ ref["stress"][0] @ rot.T
            np.testing.assert_allclose(out["stress"][0], expected, atol=1e-4 * np.abs(expected).max())


def test_translation_and_permutation(potential):
    atoms = _bulk()
    ref = _evaluate(potential, atoms)
    moved = atoms.copy()
    moved.positions += np.array([0.7, -1.3, 2.1])  # crosses the cell boundary; no wrap
    out = _evaluate(potential, moved)
    np.testing.assert_allclose(out["energy"], ref["energy"], rtol=1e-10)
    np.testing.assert_allclose(out["forces"], ref["forces"], atol=1e-10)
    np.testing.assert_allclose(out["stress"], ref["stress"], atol=1e-10)
    wrapped = atoms.copy()
    wrapped.wrap()
    np.testing.assert_allclose(_evaluate(potential, wrapped)["energy"], ref["energy"], rtol=1e-10)
    perm = np.random.default_rng(3).permutation(len(atoms))
    out = _evaluate(potential, atoms[perm])
    np.testing.assert_allclose(out["energy"], ref["energy"], rtol=1e-10)
    np.testing.assert_allclose(out["forces"], ref["forces"][perm], atol=1e-10)


def test_batch_equals_singles(potential):
    structures = [_bulk(), _molecule(), _slab()]
    batched = _evaluate(potential, *structures)
    start = 0
    for k, atoms in enumerate(structures):
        single = _evaluate(potential, atoms)
        np.testing.assert_allclose(batched["energy"][k], single["energy"][0], rtol=1e-10)
        np.testing.assert_allclose(batched["forces"][start:start + len(atoms)], single["forces"], atol=1e-10)
        np.testing.assert_allclose(batched["stress"][k], single["stress"][0], atol=1e-10, equal_nan=True)
        start += len(atoms)
    assert np.isnan(batched["stress"][1]).all() and np.isnan(batched["stress"][2]).all()


def test_supercell_extensive(potential):
    atoms = _bulk()
    ref = _evaluate(potential, atoms)
    big = atoms.repeat((2, 1, 2))
    out = _evaluate(potential, big)
    np.testing.assert_allclose(out["energy"], 4 * ref["energy"], rtol=1e-9)
    np.testing.assert_allclose(out["forces"], np.tile(ref["forces"], (4, 1)), atol=1e-8)
    np.testing.assert_allclose(out["stress"], ref["stress"], atol=1e-9)


def test_cell_smaller_than_cutoff(potential):
    """A 1-atom primitive cell (many images of itself) must equal its 27-atom supercell per atom."""
    prim = ase.build.bulk("Cu", "fcc", a=3.6)
    prim.set_cell(prim.cell.array + np.array([[0, 0.1, 0], [0.05, 0, 0], [0, 0, 0.08]]), scale_atoms=True)
    assert min(prim.cell.lengths()) < CUTOFF
    ref = _evaluate(potential, prim)
    out = _evaluate(potential, prim.repeat(3))
    np.testing.assert_allclose(out["energy"] / 27, ref["energy"], rtol=1e-9)
    np.testing.assert_allclose(out["stress"], ref["stress"], atol=1e-9)
    assert np.abs(ref["forces"]).max() < 1e-10  # one atom per cell: force vanishes by symmetry


@pytest.mark.parametrize("make", [_bulk, _molecule], ids=["bulk", "molecule"])
def test_finite_difference_forces(potential, make):
    atoms = make()
    forces = _evaluate(potential, atoms)["forces"]
    h = 1e-5
    for a, c in [(0, 0), (1, 2), (len(atoms) - 1, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, c] += h
        minus.positions[a, c] -= h
        fd = -(_evaluate(potential, plus)["energy"][0] - _evaluate(potential, minus)["energy"][0]) / (2 * h)
        assert forces[a, c] == pytest.approx(fd, abs=1e-6 + 1e-6 * abs(fd))


def test_ase_gradient_test_forces_and_stress(potential):
    """ASE's own finite-difference check on a FrechetCellFilter: atom forces and the cell (stress) degrees."""
    atoms = _bulk()
    atoms.calc = PotentialCalculator(potential, device=TEST_DEVICE, dtype="float64")
    f, fn = gradient_test(FrechetCellFilter(atoms))
    assert np.abs(f).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(f, fn, atol=1e-5 * max(1.0, np.abs(f).max()))


def test_smooth_at_cutoff(potential):
    """A dimer's energy and force go continuously to the isolated-atom values as r → cutoff."""
    def dimer(r: float) -> dict:
        return _evaluate(potential, ase.Atoms("CuAl", positions=[[0, 0, 0], [r, 0, 0]]), stress=False)

    far = dimer(CUTOFF + 0.5)
    isolated = sum(
        _evaluate(potential, ase.Atoms(s), stress=False)["energy"][0] for s in ("Cu", "Al")
    )
    assert far["energy"][0] == pytest.approx(isolated, abs=1e-10)
    assert np.abs(far["forces"]).max() == 0.0
    near = dimer(CUTOFF - 1e-3)
    assert abs(near["energy"][0] - isolated) < 1e-6
    assert np.abs(near["forces"]).max() < 1e-4
    mid = dimer(CUTOFF - 0.8)
    assert abs(mid["energy"][0] - isolated) > 1e-6  # the model does see neighbours inside the cutoff
