"""MD17 / rMD17 adapter: units, layouts, split files and errors, on real MD17 ethanol frames."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from potentials.datasets import md17

#: eV per kcal/mol, written out so the test does not share the adapter's constant.
KCAL_MOL_IN_EV = 0.0433641043
MD17_FILE = "md17/md17_ethanol_first2000.npz"


@pytest.fixture(scope="module")
def md17_path(test_data: Path) -> Path:
    return test_data / MD17_FILE


@pytest.fixture(scope="module")
def raw(md17_path: Path) -> dict[str, np.ndarray]:
    with np.load(md17_path) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def frames(md17_path: Path):
    return md17.read(md17_path)


def _write_rmd17(path: Path, raw: dict[str, np.ndarray], old_indices: np.ndarray, **overrides) -> Path:
    """An npz in the rMD17 layout built from real MD17 frames (``old_indices`` picks them)."""
    arrays = {
        "nuclear_charges": raw["z"].astype(np.int64),
        "coords": raw["R"][old_indices],
        "energies": raw["E"][old_indices, 0],
        "forces": raw["F"][old_indices],
        "old_indices": old_indices,
        "old_energies": raw["E"][old_indices, 0],
        "old_forces": raw["F"][old_indices],
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_md17_golden_frames_units(frames, raw):
    assert len(frames) == 2000
    assert all(len(atoms) == 9 for atoms in frames)
    np.testing.assert_array_equal(frames[0].numbers, [6, 6, 8, 1, 1, 1, 1, 1, 1])
    for i in (0, 1234, 1999):
        atoms = frames[i]
        assert atoms.info["source"] == "md17_ethanol_first2000.npz"
        assert atoms.info["frame"] == i and atoms.info["dataset"] == "md17"
        np.testing.assert_allclose(atoms.positions, raw["R"][i], rtol=0, atol=1e-12)
        np.testing.assert_allclose(atoms.get_potential_energy(), raw["E"][i, 0] * KCAL_MOL_IN_EV, rtol=1e-8)
        np.testing.assert_allclose(atoms.get_forces(), raw["F"][i] * KCAL_MOL_IN_EV, rtol=1e-8, atol=1e-12)
        assert not atoms.pbc.any() and "stress" not in atoms.calc.results
    # Total energy of ethanol in eV: about -4215 eV (all-electron DFT), not -97196 (kcal/mol).
    assert -4300 < frames[0].get_potential_energy() < -4100


def test_md17_energy_change_matches_force_work(frames):
    """ΔE between MD frames ≈ −½(F_i + F_{i+1})·ΔR: fails if energies and forces disagree in unit."""
    energy = np.array([atoms.get_potential_energy() for atoms in frames])
    forces = np.array([atoms.get_forces() for atoms in frames])
    pos = np.array([atoms.positions for atoms in frames])
    work = -0.5 * np.einsum("fij,fij->f", forces[1:] + forces[:-1], pos[1:] - pos[:-1])
    delta_e = np.diff(energy)
    assert np.corrcoef(work, delta_e)[0, 1] > 0.99
    slope = np.dot(work, delta_e) / np.dot(work, work)
    assert slope == pytest.approx(1.0, abs=0.05)


def test_rmd17_layout_matches_md17_frames(tmp_path, raw, md17_path):
    old = np.array([5, 17, 400, 1999, 0, 823])
    path = _write_rmd17(tmp_path / "rmd17_ethanol.npz", raw, old)
    images = md17.read(path)
    reference = md17.read(md17_path, indices=old)
    assert len(images) == len(old)
    for k, (atoms, ref) in enumerate(zip(images, reference, strict=True)):
        assert atoms.info["dataset"] == "rmd17" and atoms.info["frame"] == k
        assert atoms.info["old_indices"] == old[k] == ref.info["frame"]
        np.testing.assert_array_equal(atoms.numbers, ref.numbers)
        np.testing.assert_allclose(atoms.positions, ref.positions)
        assert atoms.get_potential_energy() == pytest.approx(raw["E"][old[k], 0] * KCAL_MOL_IN_EV, rel=1e-8)
        np.testing.assert_allclose(atoms.get_forces(), ref.get_forces())


def test_rmd17_split_file_selects_frames(tmp_path, raw):
    path = _write_rmd17(tmp_path / "rmd17_ethanol.npz", raw, np.arange(100, 150))
    split = tmp_path / "index_train_01.csv"
    split.write_text("12\n3\n\n40\n")
    indices = md17.read_split_indices(split)
    np.testing.assert_array_equal(indices, [12, 3, 40])
    images = md17.read(path, indices=indices)
    assert [atoms.info["frame"] for atoms in images] == [12, 3, 40]
    assert [atoms.info["old_indices"] for atoms in images] == [112, 103, 140]

    split.write_text("12\n1.5\n")
    with pytest.raises(ValueError, match=r"index_train_01\.csv.*line 2"):
        md17.read_split_indices(split)
    with pytest.raises(ValueError, match=r"rmd17_ethanol\.npz.*out of range.*\[50\]"):
        md17.read(path, indices=[0, 50])


@pytest.mark.parametrize(
    ("overrides", "patterns"),
    [
        ({"forces": None}, ["Keys found", "nuclear_charges", "'R'", "missing \\['forces'\\]"]),
        ({"energies": "nan@7"}, ["frame 7", "field 'energies'", "nan"]),
        ({"forces": "inf@3"}, ["frame 3", "field 'forces'", "inf"]),
        ({"coords": "nan@11"}, ["frame 11", "field 'coords'"]),
        ({"energies": "drop_frame"}, ["field 'energies'", "shape \\(19,\\)", "expected \\(20\\)"]),
        ({"forces": "extra_atom"}, ["field 'forces'", "shape \\(20, 10, 3\\)", "expected \\(20, 9, 3\\)"]),
        ({"old_indices": "drop_frame"}, ["field 'old_indices'"]),
    ],
    ids=["missing-key", "nan-energy", "inf-force", "nan-coords", "frame-count", "atom-count", "old-indices"],
)
def test_rmd17_broken_files_name_file_frame_field(tmp_path, raw, overrides, patterns):
    good = _write_rmd17(tmp_path / "good.npz", raw, np.arange(20))
    with np.load(good) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for key, how in overrides.items():
        if how is None:
            arrays.pop(key)
        elif how == "drop_frame":
            arrays[key] = arrays[key][:-1]
        elif how == "extra_atom":
            arrays[key] = np.concatenate([arrays[key], arrays[key][:, :1]], axis=1)
        else:
            value, frame = how.split("@")
            arrays[key] = arrays[key].copy()
            arrays[key][int(frame)] = float(value)  # the whole frame (energy, or all atoms' values)
    broken = tmp_path / "broken_rmd17.npz"
    np.savez(broken, **arrays)
    with pytest.raises(ValueError) as error:
        md17.read(broken)
    message = str(error.value)
    assert "broken_rmd17.npz" in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_md17_layout_errors(tmp_path, raw):
    bad_energy = raw["E"].copy()
    bad_energy[1500, 0] = np.nan
    path = tmp_path / "md17_bad.npz"
    np.savez(path, R=raw["R"], z=raw["z"], E=bad_energy, F=raw["F"])
    with pytest.raises(ValueError, match=r"md17_bad\.npz', frame 1500, field 'E'"):
        md17.read(path)
    # Selecting frames that avoid the bad one reads fine, with MD17's optional metadata kept.
    np.savez(path, R=raw["R"], z=raw["z"], E=bad_energy, F=raw["F"], name=np.array("ethanol"))
    images = md17.read(path, indices=[0, 1])
    assert [a.info["name"] for a in images] == ["ethanol", "ethanol"]

    other = tmp_path / "unrelated.npz"
    np.savez(other, a=np.zeros(3), b=np.ones(2))
    with pytest.raises(ValueError, match=r"unrelated\.npz.*Keys found: \['a', 'b'\].*'E', 'F', 'R', 'z'"):
        md17.read(other)
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match=r"notes\.npz.*cannot be read"):
        md17.read(text)
