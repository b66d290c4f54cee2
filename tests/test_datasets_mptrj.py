"""MPtrj adapter on the real sample frames: units and stress sign, JSON ≡ ASE database, streaming, splits, bad input."""

from __future__ import annotations

import gzip
import io
import json
import re
import tracemalloc

import ase.db
import numpy as np
import pytest
from ase import units
from ase.stress import voigt_6_to_full_3x3_stress

from benchmarks.mptrj_streaming import write_synthetic_mptrj
from potentials.datasets import mptrj
from potentials.datasets.datamodule import AtomsDataModule

JSON = "mptrj/mptrj_sample_11_frames.json"
DB = "mptrj/mptrj_10_thin_systems.db"
GOLDEN = ("mp-1205402", "mp-1393488-0-0")  # Ba6Ir4Sm2O18, 30 atoms, with magnetic moments
RELAXATION = "mp-1020019"  # Li4N2O4P2: 10 frames of one relaxation


@pytest.fixture(scope="module")
def sample(test_data) -> dict:
    return json.loads((test_data / JSON).read_text())


def _read(path, **options) -> list:
    return list(mptrj.read(path, progress=False, **options))


def test_golden_frame_units_sign_and_ids(test_data, sample):
    """Energy label, forces, kBar → eV/Å³ with ASE's sign, pressure, magmoms and ids of one real frame."""
    raw = sample[GOLDEN[0]][GOLDEN[1]]
    atoms = next(a for a in _read(test_data / JSON) if a.info["frame"] == GOLDEN[1])
    assert atoms.get_chemical_formula() == "Ba6Ir4O18Sm2" and atoms.pbc.all()
    assert atoms.get_potential_energy() == pytest.approx(raw["corrected_total_energy"], abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), raw["force"], atol=1e-12)
    stress = voigt_6_to_full_3x3_stress(atoms.get_stress())
    kbar = np.array(raw["stress"])
    np.testing.assert_allclose(stress, -0.1 * units.GPa * kbar, rtol=1e-12, atol=1e-15)
    assert stress[0, 0] == pytest.approx(1.2105534e-4, rel=1e-6)  # −0.19395 kBar (VASP) → +1.21e-4 eV/Å³ (ASE)
    # pressure P = −tr(σ)/3 (ASE sign) equals VASP's tr(stress)/3 in kBar: 0.3499 kBar = 0.03499 GPa
    assert -np.trace(stress) / 3 / units.GPa == pytest.approx(np.trace(kbar) / 3 * 0.1, rel=1e-12)
    np.testing.assert_allclose(atoms.arrays["magmoms"], raw["magmom"])
    assert atoms.info["mp_id"] == "mp-1205402" and atoms.info["task_id"] == "mp-1393488"
    assert (atoms.info["calc_id"], atoms.info["ionic_step"]) == (0, 0)
    assert atoms.info["bandgap"] == 0.0 and atoms.info["energy_per_atom"] == raw["energy_per_atom"]
    uncorrected = _read(test_data / JSON, energy_key="uncorrected_total_energy")[0]
    assert uncorrected.get_potential_energy() == pytest.approx(-208.0919485, abs=1e-10)


def test_json_and_ase_db_give_identical_atoms(test_data):
    """The same 11 frames from the JSON (kBar, VASP sign) and the database (eV/Å³, ASE sign) agree exactly."""
    for key in mptrj.ENERGY_KEYS:
        from_json = {a.info["frame"]: a for a in _read(test_data / JSON, energy_key=key)}
        from_db = {a.info["frame"]: a for a in _read(test_data / DB, energy_key=key)}
        assert sorted(from_json) == sorted(from_db) and len(from_db) == 11
        for frame, a in from_json.items():
            b = from_db[frame]
            assert (a.numbers == b.numbers).all() and (a.pbc == b.pbc).all()
            np.testing.assert_allclose(a.positions, b.positions, atol=1e-12)
            np.testing.assert_array_equal(a.cell.array, b.cell.array)
            for name in ("energy", "forces", "stress"):
                np.testing.assert_allclose(a.calc.results[name], b.calc.results[name], rtol=1e-9, atol=1e-12)
            assert ("magmoms" in a.arrays) == ("magmoms" in b.arrays) == (frame == GOLDEN[1])
            if "magmoms" in a.arrays:
                np.testing.assert_array_equal(a.arrays["magmoms"], b.arrays["magmoms"])
            info_a = {k: v for k, v in a.info.items() if k != "source"}
            info_b = {k: v for k, v in b.info.items() if k != "source"}
            assert info_a == info_b


def test_stress_sign_matches_energy_changes_along_the_relaxation(test_data):
    """Between consecutive ionic steps, ΔE ≈ −F̄·Δr + V·σ̄:ε holds with ASE's sign and fails with the other."""
    frames = [a for a in _read(test_data / JSON) if a.info["mp_id"] == RELAXATION and a.info["calc_id"] == 1]
    frames.sort(key=lambda a: a.info["ionic_step"])
    errors = {+1: [], -1: []}
    strain_work = []
    for a, b in zip(frames[:-1], frames[1:], strict=True):
        h1, h2 = a.cell.array, b.cell.array
        ds = b.get_scaled_positions(wrap=False) - a.get_scaled_positions(wrap=False)
        ds -= np.round(ds)
        force_work = -np.sum((a.get_forces() + b.get_forces()) / 2 * (ds @ ((h1 + h2) / 2)))
        eps = np.linalg.solve(h1, h2) - np.eye(3)
        eps = (eps + eps.T) / 2
        if np.abs(eps).max() > 0.02:  # the first steps move far; the trapezoid rule needs small steps
            continue
        sigma = (voigt_6_to_full_3x3_stress(a.get_stress()) + voigt_6_to_full_3x3_stress(b.get_stress())) / 2
        work = (a.get_volume() + b.get_volume()) / 2 * np.sum(sigma * eps)
        strain_work.append(abs(work))
        de = b.get_potential_energy() - a.get_potential_energy()
        for sign in errors:
            errors[sign].append(abs(force_work + sign * work - de))
    assert len(strain_work) >= 5 and max(strain_work) > 0.01  # the strain term matters in these steps
    assert max(errors[+1]) < 0.004, errors[+1]  # |ΔE| of these steps: 0.005–0.1 eV
    assert sum(errors[-1]) > 10 * sum(errors[+1]), errors


def test_streams_with_flat_memory(tmp_path, test_data):
    """Peak Python memory while streaming a 4x larger file stays the same (frames are never accumulated)."""
    def peak(fn) -> int:
        tracemalloc.start()
        fn()
        value = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return value

    peaks, sizes = [], []
    for n_materials in (32, 128):
        path = tmp_path / f"synthetic_{n_materials}.json"
        n_frames = write_synthetic_mptrj(path, test_data / JSON, n_materials)
        sizes.append(path.stat().st_size)
        counted = []
        peaks.append(peak(lambda: counted.append(sum(1 for _ in mptrj.read(path, progress=False)))))  # noqa: B023
        assert counted == [n_frames]
    kept = peak(lambda: list(mptrj.read(path, progress=False)))
    assert sizes[1] > 3.5 * sizes[0] > 1e6
    assert peaks[1] < 1.3 * peaks[0], (peaks, sizes)
    assert kept > 3 * peaks[1], (kept, peaks)  # the measurement does see memory that grows with the file


def test_progress_bar_counts_bytes_and_gzip_reads_the_same(tmp_path, test_data, monkeypatch):
    path = test_data / JSON
    plain = _read(path)
    gz = tmp_path / "sample.json.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    bars = []

    class RecordingBar(mptrj.tqdm):
        def close(self):
            bars.append((self.n, self.total, self.unit))
            super().close()

    monkeypatch.setattr(mptrj, "tqdm", RecordingBar)
    packed = list(mptrj.read(gz, progress=True))
    assert set(bars) == {(gz.stat().st_size, gz.stat().st_size, "B")}  # compressed bytes, all of them read
    assert [a.info["frame"] for a in packed] == [a.info["frame"] for a in plain]
    np.testing.assert_array_equal(packed[3].get_forces(), plain[3].get_forces())


def test_splits_keep_each_material_in_one_split(tmp_path, test_data):
    path = tmp_path / "materials.json"
    write_synthetic_mptrj(path, test_data / JSON, 20)  # 20 materials: 10 of 1 frame, 10 of 10 frames
    dm = AtomsDataModule(source=lambda: mptrj.read(path, progress=False), cutoff=3.0,
                         split={"val": 4, "test": 4, "seed": 1, "group_by": "mp_id"})
    dm.setup()
    frames = list(mptrj.read(path, progress=False))
    materials = {name: {frames[i].info["mp_id"] for i in idx} for name, idx in dm.indices.items()}
    assert [len(materials[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not (materials["train"] & materials["val"] or materials["train"] & materials["test"]
                or materials["val"] & materials["test"])
    assert sum(len(i) for i in dm.indices.values()) == len(frames) == 110


# ------------------------------------------------------------------------------------------- bad input


def _zero_volume(f):
    f["structure"]["lattice"]["matrix"][1] = list(f["structure"]["lattice"]["matrix"][0])


def _short_forces(f):
    f["force"] = f["force"][:-1]


def _unknown_element(f):
    f["structure"]["sites"][2]["species"][0]["element"] = "Xx"


def _short_magmoms(f):
    f["magmom"] = [0.0, 0.0]


MUTATIONS = {
    "missing key": (lambda f: f.pop("force"), "force", "missing"),
    "nan energy": (lambda f: f.update(corrected_total_energy=float("nan")), "corrected_total_energy", "not finite"),
    "inf stress": (lambda f: f["stress"][1].__setitem__(1, float("inf")), "stress", "not finite"),
    "short forces": (_short_forces, "force", r"shape \(11, 3\), expected \(12, 3\)"),
    "zero-volume cell": (_zero_volume, "structure.lattice.matrix", "zero volume"),
    "unknown element": (_unknown_element, "structure.sites.species", "'Xx', not a chemical element"),
    "short magmoms": (_short_magmoms, "magmom", r"shape \(2,\)"),
}
BAD = ("mp-1020019", "mp-1095441-1-9")


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_malformed_frame_is_named_or_skipped_and_reported(tmp_path, sample, case):
    mutate, field, message = MUTATIONS[case]
    data = json.loads(json.dumps(sample))
    mutate(data[BAD[0]][BAD[1]])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # Python's json writes NaN/Infinity tokens for non-finite floats
    pattern = rf"file 'bad\.json', frame {BAD[1]}, field '{re.escape(field)}': .*{message}"
    with pytest.raises(ValueError, match=pattern):
        _read(path)
    report = tmp_path / "skipped.tsv"
    frames = _read(path, skip_invalid=True, report=report)
    assert len(frames) == 10 and BAD[1] not in {a.info["frame"] for a in frames}
    lines = report.read_text().splitlines()
    assert lines[0] == "source\trecord\tfield\terror" and lines[-1] == "# skipped 1 of 11 records"
    assert lines[1].split("\t")[:3] == ["bad.json", BAD[1], field]


def test_ase_db_row_with_nan_forces_is_named(tmp_path, test_data):
    path = tmp_path / "bad.db"
    with ase.db.connect(test_data / DB) as src, ase.db.connect(path) as dst:
        for row in src.select():
            atoms = row.toatoms()
            if row.data["uid"] == BAD[1]:
                atoms.calc.results["forces"][3, 1] = np.nan
            dst.write(atoms, data=row.data)
    with pytest.raises(ValueError, match=rf"file 'bad\.db', frame {BAD[1]}, field 'force': .*not finite"):
        _read(path)
    assert len(_read(path, skip_invalid=True, report=tmp_path / "r.tsv")) == 10


def test_broken_json_and_options_fail_clearly(tmp_path, test_data):
    text = (test_data / JSON).read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"file 'cut\.json': .*last frame read: mp-1020019/"):
        _read(cut)
    not_mptrj = tmp_path / "list.json"
    not_mptrj.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        _read(not_mptrj)
    with pytest.raises(ValueError, match="energy_key must be one of"):
        mptrj.read(test_data / JSON, energy_key="energy_per_atom")
    with pytest.raises(FileNotFoundError):
        mptrj.read(tmp_path / "absent.json")
    assert [a.info["frame"] for a in _read(test_data / DB, limit=2)] == ["mp-1393488-0-0", "mp-1095441-0-1"]
    assert len(_read(test_data / JSON, limit=4)) == 4


@pytest.mark.parametrize("read_size", [1, 3, 7, 64])
def test_non_finite_tokens_become_strings_across_read_boundaries(read_size):
    text = b'{"a": [NaN, 1.5, -Infinity], "NaN, b": ["NaN", Infinity],\n "c": {"d": NaN} }'
    stream = mptrj._NonFiniteTokens(io.BytesIO(text))
    chunks = []
    while chunk := stream.read(read_size):
        chunks.append(chunk)
    assert json.loads(b"".join(chunks)) == {"a": ["NaN", 1.5, "-Infinity"], "NaN, b": ["NaN", "Infinity"],
                                            "c": {"d": "NaN"}}
