"""Batched FIRE relaxation: the same results as ASE's FIRE one structure at a time, per-structure convergence,
bad structures reported while the rest relax, and batches bounded by structures and atoms."""

from __future__ import annotations

import json

import ase
import ase.build
import ase.io
import numpy as np
import pytest

from potentials.batch_relax import relax_many
from potentials.calculator import PotentialCalculator
from potentials.cli.main import main
from potentials.errors import PotentialsInputError
from potentials.relax import RelaxResult, relax

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calc(cu_model) -> PotentialCalculator:
    return PotentialCalculator.from_file(cu_model, dtype="float64")


def _structures(periodic_only: bool) -> list[ase.Atoms]:
    """Cu crystals of 1 to 32 atoms with different lattice constants and rattles (and a cluster without cell)."""
    out = []
    for i, (a, cubic, rep) in enumerate([(3.55, True, 1), (3.70, False, 2), (3.60, True, 2), (3.66, False, 1),
                                         (3.52, False, 2)]):
        atoms = ase.build.bulk("Cu", "fcc", a=a, cubic=cubic).repeat(rep)
        atoms.rattle(0.06, seed=i)
        out.append(atoms)
    if not periodic_only:
        cluster = ase.Atoms("Cu4", positions=[[0, 0, 0], [2.4, 0.1, 0], [0.2, 2.6, 0], [1.1, 1.0, 2.2]])
        out.append(cluster)
    return out


def _fmax_of(atoms: ase.Atoms, calc, cell: bool) -> float:
    from ase.filters import FrechetCellFilter

    atoms = atoms.copy()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if cell else atoms
    return float(np.linalg.norm(target.get_forces(), axis=1).max())


@pytest.mark.parametrize("cell", [False, True], ids=["positions", "cell"])
def test_batched_matches_one_by_one(calc, cell):
    structures = _structures(periodic_only=cell)
    one = [relax(a, calc, fmax=0.02, steps=300, cell=cell) for a in structures]
    many = relax_many(structures, calc.potential, fmax=0.02, steps=300, cell=cell, batch_size=3)
    for atoms, r1, r2 in zip(structures, one, many, strict=True):
        assert isinstance(r2, RelaxResult)
        assert r2.converged == r1.converged is True
        assert r2.steps == r1.steps  # the same FIRE path, step for step
        assert abs(r2.final_energy - r1.final_energy) / len(atoms) < 1e-3
        assert r2.initial_energy == pytest.approx(r1.initial_energy, abs=1e-9)
        assert r2.final_fmax == pytest.approx(r1.final_fmax, abs=1e-6) and r2.final_fmax < 0.02
        if not cell:  # the relaxed structure, evaluated afresh by the ASE calculator, is below the threshold
            assert r2.final_fmax == pytest.approx(_fmax_of(r2.atoms, calc, cell), abs=1e-9)
        assert np.allclose(r2.atoms.positions, r1.atoms.positions, atol=1e-6)
        if cell:
            assert np.allclose(r2.atoms.cell.array, r1.atoms.cell.array, atol=1e-6)
            assert not np.allclose(r2.atoms.cell.array, atoms.cell.array, atol=1e-3)  # the cell did move


def test_each_structure_converges_on_its_own(calc):
    near = ase.build.bulk("Cu", "fcc", a=3.60, cubic=True)
    near.rattle(0.01, seed=1)
    far = ase.build.bulk("Cu", "fcc", a=3.60, cubic=True).repeat(2)
    far.rattle(0.25, seed=2)
    structures = [far, near, far.copy()]
    one = [relax(a, calc, fmax=0.01, steps=30) for a in structures]
    many = relax_many(structures, calc.potential, fmax=0.01, steps=30, batch_size=3)
    assert [r.converged for r in many] == [r.converged for r in one] == [False, True, False]
    assert many[1].steps < 30 and many[0].steps == many[2].steps == 30  # the converged one left early
    assert many[0].final_fmax >= 0.01 and many[1].final_fmax < 0.01
    for r1, r2, atoms in zip(one, many, structures, strict=True):
        assert abs(r1.final_energy - r2.final_energy) / len(atoms) < 1e-3


def _bad_and_good() -> tuple[list[ase.Atoms], list[str]]:
    good = _structures(periodic_only=True)[:3]
    gold = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    gold[1].symbol = "Au"  # an element the model never saw
    overlap = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    overlap.positions[2] = overlap.positions[1] + [0.02, 0, 0]
    return [good[0], gold, good[1], overlap, good[2]], ["never saw: Au", "overlapping"]


def test_bad_structures_are_reported_and_the_rest_relaxes(calc):
    structures, messages = _bad_and_good()
    results = relax_many(structures, calc.potential, fmax=0.02, batch_size=2)
    assert isinstance(results[1], PotentialsInputError) and messages[0] in str(results[1])
    assert isinstance(results[3], PotentialsInputError) and messages[1] in str(results[3])
    for i in (0, 2, 4):
        assert results[i].converged and results[i].final_fmax < 0.02
    with pytest.raises(PotentialsInputError, match="overlapping"):  # the one-by-one function refuses it too
        relax(structures[3], calc)


@pytest.mark.parametrize("batch", [[], ["--batch-size", "2"]], ids=["one-by-one", "batched"])
def test_cli_reports_bad_structures_and_relaxes_the_rest(cu_model, tmp_path, capsys, batch):
    structures, messages = _bad_and_good()
    ase.io.write(tmp_path / "set.extxyz", structures)
    out = tmp_path / "out"
    code = main(["relax", str(cu_model), str(tmp_path / "set.extxyz"), "--fmax", "0.02", "--out", str(out),
                 "--no-progress", *batch])
    captured = capsys.readouterr()
    assert code == 1
    assert "error: structure set_1:" in captured.err and messages[0] in captured.err
    assert "error: structure set_3:" in captured.err and messages[1] in captured.err
    assert "3/5 converged" in captured.out and "2 rejected" in captured.out
    rows = json.loads((out / "summary.json").read_text())
    assert [r["structure"] for r in rows] == [f"set_{i}" for i in range(5)]
    assert [("error" in r) for r in rows] == [False, True, False, True, False]
    for i in (0, 2, 4):
        assert rows[i]["converged"] and (out / f"set_{i}_relaxed.extxyz").is_file()
        frames = ase.io.read(out / f"set_{i}.traj", ":")
        assert len(frames) == rows[i]["steps"] + 1  # the start and every step, as ASE's optimisers write


def test_max_atoms_splits_batches(calc, cu_model, tmp_path, capsys, monkeypatch):
    structures = _structures(periodic_only=True)  # 4, 8, 32, 1, 8 atoms
    sizes = [len(a) for a in structures]
    potential = calc.potential
    calls: list[list[int]] = []
    forward = type(potential).forward

    def counting(self, data, *args, **kwargs):
        calls.append(data.num_atoms.tolist())
        return forward(self, data, *args, **kwargs)

    monkeypatch.setattr(type(potential), "forward", counting)
    results = relax_many(structures, potential, fmax=0.02, batch_size=4, max_atoms=30)
    assert all(r.converged for r in results)
    assert all(len(c) <= 4 for c in calls)
    assert all(sum(c) <= 30 or len(c) == 1 for c in calls)  # a structure above the limit runs alone
    assert [32] in calls and any(len(c) > 1 for c in calls)
    assert sum(len(c) for c in calls) == sum(r.steps + 1 for r in results)  # one evaluation per step per structure
    assert sorted({n for c in calls for n in c}) == sorted(set(sizes))

    # the same through the command line
    monkeypatch.undo()
    ase.io.write(tmp_path / "set.extxyz", structures)
    out = tmp_path / "out"
    assert main(["relax", str(cu_model), str(tmp_path / "set.extxyz"), "--fmax", "0.02", "--out", str(out),
                 "--no-progress", "--max-atoms", "30"]) == 0
    capsys.readouterr()
    rows = json.loads((out / "summary.json").read_text())
    assert [r["steps"] for r in rows] == [r.steps for r in results]
    assert [r["energy_eV"] for r in rows] == pytest.approx([r.final_energy for r in results], abs=1e-9)


def test_options_are_checked(cu_model, tmp_path, calc):
    ase.io.write(tmp_path / "cu.xyz", ase.build.bulk("Cu"))
    with pytest.raises(SystemExit, match="FIRE"):
        main(["relax", str(cu_model), str(tmp_path), "--batch-size", "4", "--optimizer", "BFGS"])
    with pytest.raises(ValueError, match="positive"):
        relax_many([ase.build.bulk("Cu")], calc.potential, batch_size=0)
