"""Adapter for files ASE reads: real rMD17 extxyz, MPtrj database, OC20 trajectory; units, signs, errors."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from potentials.datasets import ase_files

KCAL_MOL_IN_EV = 0.0433641043
RMD17_FILE = "rmd17/rmd17_ethanol_reduced_100.xyz"


def _parse_extxyz_by_hand(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Energies [F] and forces [F, N, 3] straight from the text (columns: species, pos×3, forces×3)."""
    lines = path.read_text().splitlines()
    energies, forces, i = [], [], 0
    while i < len(lines) and lines[i].strip():
        n_atoms = int(lines[i])
        energies.append(float(re.search(r"energy=(\S+)", lines[i + 1]).group(1)))
        rows = [line.split() for line in lines[i + 2 : i + 2 + n_atoms]]
        forces.append(np.array([[float(x) for x in row[4:7]] for row in rows]))
        i += n_atoms + 2
    return np.array(energies), np.array(forces)


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _compressed_copper() -> tuple:
    """A rattled Cu cell compressed by 2%, labelled by EMT directly: (atoms, energy, forces, stress Voigt)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.set_cell(atoms.cell * 0.98, scale_atoms=True)
    atoms.positions += np.random.default_rng(3).normal(0.0, 0.03, atoms.positions.shape)
    atoms.calc = EMT()
    return atoms, atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def test_rmd17_extxyz_converted_from_kcal_mol(test_data, no_warnings):
    path = test_data / RMD17_FILE
    energies, forces = _parse_extxyz_by_hand(path)
    images = ase_files.read(path, energy_unit="kcal/mol")
    assert len(images) == len(energies) == 100
    for i in (0, 57, 99):
        atoms = images[i]
        assert atoms.info["source"] == path.name and atoms.info["frame"] == i
        assert sorted(atoms.numbers) == [1, 1, 1, 1, 1, 1, 6, 6, 8]
        assert atoms.get_potential_energy() == pytest.approx(energies[i] * KCAL_MOL_IN_EV, rel=1e-8)
        np.testing.assert_allclose(atoms.get_forces(), forces[i] * KCAL_MOL_IN_EV, rtol=1e-8, atol=1e-10)
        assert "stress" not in atoms.calc.results


def test_kcal_mol_read_as_ev_warns(test_data):
    path = test_data / RMD17_FILE
    with pytest.warns(UserWarning, match=r"rmd17_ethanol_reduced_100\.xyz.*100 of 100 energies.*kcal/mol"):
        images = ase_files.read(path)
    energies, _ = _parse_extxyz_by_hand(path)
    assert images[0].get_potential_energy() == pytest.approx(energies[0], rel=1e-12)  # left as it is


def test_extxyz_stress_round_trip_keeps_ase_sign(tmp_path, no_warnings):
    atoms, energy, forces, stress = _compressed_copper()
    assert stress[:3].sum() < 0  # compressed: the cell pushes outwards, negative under ASE's sign
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    (read,) = ase_files.read(path)
    assert read.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(read.get_forces(), forces, atol=1e-7)
    np.testing.assert_allclose(read.get_stress(), stress, atol=1e-9)
    (in_mev,) = ase_files.read(path, energy_unit="meV")  # the unit applies to forces and stress as well
    np.testing.assert_allclose(in_mev.get_stress(), stress * 1e-3, atol=1e-12)
    np.testing.assert_allclose(in_mev.get_forces(), forces * 1e-3, atol=1e-10)


def test_labels_from_info_and_array_keys(tmp_path, no_warnings):
    atoms, energy, forces, stress = _compressed_copper()
    frames = []
    for k in range(2):
        frame = atoms.copy()  # no calculator: labels only under REF_ keys
        if k == 0:
            frame.info["REF_energy"] = energy
        frame.info["REF_stress"] = np.array([[stress[0], stress[5], stress[4]],
                                             [stress[5], stress[1], stress[3]],
                                             [stress[4], stress[3], stress[2]]])
        frame.arrays["REF_forces"] = forces
        frames.append(frame)
    path = tmp_path / "ref_keys.extxyz"
    ase.io.write(path, frames, format="extxyz")
    images = ase_files.read(path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    assert images[0].get_potential_energy() == pytest.approx(energy, abs=1e-9)
    assert "energy" not in images[1].calc.results  # absent stays absent, never a zero
    for image in images:
        np.testing.assert_allclose(image.get_forces(), forces, atol=1e-7)
        np.testing.assert_allclose(image.get_stress(), stress, atol=1e-9)  # 3x3 in the file, Voigt out
        assert "REF_energy" not in image.info and "REF_forces" not in image.arrays
    with pytest.raises(ValueError, match=r"ref_keys\.extxyz.*'DFT_energy' is in none of the 2 frames"):
        ase_files.read(path, energy_key="DFT_energy")


def test_mptrj_database(test_data, no_warnings):
    path = test_data / "mptrj/mptrj_10_thin_systems.db"
    images = ase_files.read(path)
    with ase.db.connect(path) as db:
        rows = list(db.select())
    assert len(images) == len(rows) == 11
    for i, (atoms, row) in enumerate(zip(images, rows, strict=True)):
        assert atoms.info["frame"] == i and atoms.pbc.all()
        assert atoms.get_potential_energy() == pytest.approx(row.energy, rel=1e-12)
        np.testing.assert_allclose(atoms.get_forces(), row.forces)
        assert atoms.get_stress().shape == (6,)
        np.testing.assert_allclose(atoms.get_stress(), row.stress)


def test_oc20_trajectory_keeps_constraints(test_data, no_warnings):
    path = test_data / "oc20/oc20_is2res_random1447590.traj"
    images = ase_files.read(path)
    raw = ase.io.read(path, ":")
    assert len(images) == 47
    fixed = images[0].constraints[0].get_indices()
    np.testing.assert_array_equal(fixed, [2, 3, 4, 5, 6, 10, 11, 12, 13, 14])
    for atoms, original in zip(images, raw, strict=True):
        assert atoms.constraints[0].get_indices().tolist() == fixed.tolist()
        # The raw DFT label is kept as it is (the file holds non-zero forces on fixed atoms too) ...
        np.testing.assert_array_equal(atoms.calc.results["forces"], original.calc.results["forces"])
        # ... and the preserved constraint zeroes them where ASE applies it, leaving free atoms alone.
        forces = atoms.get_forces()
        assert np.all(forces[fixed] == 0.0)
        free = np.setdiff1d(np.arange(len(atoms)), fixed)
        np.testing.assert_array_equal(forces[free], original.calc.results["forces"][free])
        assert atoms.get_potential_energy() == original.get_potential_energy()
        assert "stress" not in atoms.calc.results
    assert images[-1].get_potential_energy() < images[0].get_potential_energy()  # a relaxation goes downhill
    assert np.linalg.norm(images[-1].get_forces(), axis=1).max() < 0.03  # OC20 stops at fmax 0.03, free atoms


def test_index_selects_frames_and_keeps_file_positions(test_data):
    path = test_data / "oc20/oc20_is2res_random1447590.traj"
    assert [a.info["frame"] for a in ase_files.read(path, index="10:20:3")] == [10, 13, 16, 19]
    assert [a.info["frame"] for a in ase_files.read(path, index=-1)] == [46]
    with pytest.raises(ValueError, match=r"frame 47 out of range.*47 frames"):
        ase_files.read(path, index=47)


@pytest.mark.parametrize(("field", "frame"), [("energy", 2), ("forces", 1), ("stress", 0)])
def test_non_finite_label_names_file_frame_field(tmp_path, field, frame):
    atoms, energy, forces, stress = _compressed_copper()
    frames = []
    for k in range(3):
        labels = {"energy": energy, "forces": forces.copy(), "stress": stress.copy()}
        if k == frame:
            labels[field] = np.nan if field == "energy" else np.full_like(labels[field], np.inf)
        image = atoms.copy()
        image.calc = SinglePointCalculator(image, **labels)
        frames.append(image)
    path = tmp_path / "broken.extxyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(ValueError, match=rf"broken\.extxyz', frame {frame}, field '{field}'.*not finite"):
        ase_files.read(path)


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is\nnot a structure file\n")
    with pytest.raises(ValueError, match=r"garbage\.xyz.*ASE cannot read"):
        ase_files.read(garbage)
    with pytest.raises(FileNotFoundError, match="absent.extxyz"):
        ase_files.read(tmp_path / "absent.extxyz")
    with pytest.raises(ValueError, match="unknown energy_unit 'kcal'"):
        ase_files.read(garbage, energy_unit="kcal")
