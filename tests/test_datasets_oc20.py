"""OC20 adapter: S2EF pairs, trajectories, pickled-PyG LMDB and ASE-LMDB written from the real OC20 frames."""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zlib

import lmdb
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.jsonio import encode

from potentials.datasets import aselmdb, oc20, pyg_lmdb
from potentials.graph import AtomicGraph
from tests import oc20_samples as samples
from tests.oc20_samples import REFERENCE, SID


@pytest.fixture(scope="module")
def frames(test_data):
    return samples.load_frames(test_data)


def _read(path, **options):
    return list(oc20.read(path, progress=False, **options))


def _raw(atoms):
    return atoms.calc.results["energy"], atoms.calc.results["forces"]


def test_s2ef_pair_references_energy_and_keeps_tags_and_fixed_atoms(tmp_path, frames):
    xyz, txt = samples.write_s2ef_pair(tmp_path, 0, frames[:12], fids=range(12))
    records = _read(xyz)
    assert len(records) == 12 and [a.info["fid"] for a in records] == list(range(12))
    for atoms, frame in zip(records, frames[:12], strict=True):
        energy, forces = _raw(frame)
        assert atoms.get_potential_energy() == pytest.approx(energy - REFERENCE, abs=1e-8)
        np.testing.assert_allclose(atoms.calc.results["forces"], forces, atol=5e-9)  # 8 decimals in the file
        assert atoms.info["sid"] == SID and atoms.info["ref_energy"] == REFERENCE
    graph = AtomicGraph.from_atoms(records[0], 5.0)
    fixed = samples.fixed_mask(frames[0])
    assert fixed.sum() == 10 and graph.fixed.tolist() == fixed.tolist()
    assert graph.tags.tolist() == samples.oc20_tags(frames[0]).tolist() and int(graph.tags[-1]) == 2  # O adsorbate
    assert np.abs(records[0].calc.results["forces"][fixed]).max() > 0.1  # fixed atoms keep their DFT forces
    raw = _read(txt, referenced=False)  # the .txt of a pair names the pair too
    assert raw[5].get_potential_energy() == pytest.approx(_raw(frames[5])[0], abs=1e-8)


def test_folder_of_pairs_reads_in_natural_order_with_xz(tmp_path, frames):
    samples.write_s2ef_pair(tmp_path, 10, frames[30:], fids=range(30, 47))
    samples.write_s2ef_pair(tmp_path, 2, frames[:30], fids=range(30), xz=True)
    records = _read(tmp_path)
    assert [a.info["fid"] for a in records] == list(range(47))
    assert records[29].info["source"] == "2.extxyz.xz" and records[30].info["source"] == "10.extxyz"
    assert len(_read(tmp_path, limit=7)) == 7


def test_pair_files_that_disagree_fail(tmp_path, frames):
    xyz, txt = samples.write_s2ef_pair(tmp_path, 0, frames[:5], fids=range(5))
    txt.write_text("".join(txt.read_text().splitlines(keepends=True)[:4]))
    with pytest.raises(ValueError, match=r"file '0\.txt': has 4 lines but 0\.extxyz has more frames"):
        _read(xyz)
    txt.unlink()
    lone = tmp_path / "x"
    lone.mkdir()
    samples.write_s2ef_pair(lone, 0, frames[:2], fids=range(2))
    (lone / "1.extxyz").write_text(samples.extxyz_frame(frames[3]))
    with pytest.raises(ValueError, match=r"mixes kinds .*'traj': \['1\.extxyz'\]"):
        _read(lone)
    (lone / "1.extxyz").unlink()
    (lone / "7.txt").write_text(f"random{SID},frame0,{REFERENCE}\n")
    with pytest.raises(FileNotFoundError, match=r"\.txt files without their S2EF frames .*'7\.txt'"):
        _read(lone)


def test_trajectory_frames_and_is2re_record(tmp_path, frames, test_data):
    traj = test_data / samples.TRAJECTORY
    with pytest.raises(ValueError, match="raw DFT energies and no reference energy was given"):
        oc20.read(traj)
    refs = tmp_path / "system.txt"
    refs.write_text(f"random{SID},{REFERENCE}\n")
    records = _read(traj, references=refs)
    assert len(records) == 47 and records[46].info["fid"] == 46
    assert records[46].get_potential_energy() == pytest.approx(-19.03837366 - REFERENCE, abs=1e-8)
    (is2re,) = _read(traj, task="is2re", referenced=False)
    np.testing.assert_allclose(is2re.positions, frames[0].positions)
    np.testing.assert_allclose(is2re.arrays["pos_relaxed"], frames[-1].positions)
    assert is2re.get_potential_energy() == is2re.info["y_relaxed"] == pytest.approx(-19.03837366)
    assert is2re.info["y_init"] == pytest.approx(-17.87281992) and "forces" not in is2re.calc.results
    # the same trajectory as OC20 distributes it: random<sid>.extxyz.xz, in a folder with a system.txt of references
    folder = tmp_path / "is2res"
    folder.mkdir()
    samples.write_text(folder / f"random{SID}.extxyz.xz", "".join(samples.extxyz_frame(a) for a in frames))
    (folder / "system.txt").write_text(refs.read_text())
    (from_xz,) = _read(folder, task="is2rs", references=folder / "system.txt")
    assert from_xz.info["y_relaxed"] == pytest.approx(-19.03837366 - REFERENCE, abs=1e-8)
    np.testing.assert_allclose(from_xz.arrays["pos_relaxed"], frames[-1].positions, atol=1e-8)


def _s2ef_pickles(frames):
    return [pickle.dumps(samples.pyg_record(a, i)) for i, a in enumerate(frames)]


def test_pickled_lmdb_needs_trust_and_reads_pyg1_and_pyg2_records(tmp_path, frames):
    values = _s2ef_pickles(frames[:3]) + [samples.pickle_legacy(samples.pyg_record(frames[3], 3))]
    path = samples.write_pyg_lmdb(tmp_path / "data.0000.lmdb", values)
    with pytest.raises(pyg_lmdb.UntrustedPickleError, match="unpickling runs any code.*trusted=True"):
        oc20.read(path)
    with pytest.warns(UserWarning, match="unpickling its records"):
        records = _read(path, trusted=True)
    assert b"torch_geometric.data.data\nData" in values[3] and b"_store" not in values[3]  # a 1.x-style pickle
    for k, atoms in enumerate(records):
        energy, forces = _raw(frames[k])
        assert atoms.info["fid"] == k and atoms.info["sid"] == SID and atoms.info["task"] == "s2ef"
        assert atoms.get_potential_energy() == pytest.approx(energy)  # y is taken as stored
        np.testing.assert_allclose(atoms.calc.results["forces"], forces, atol=1e-6)  # float32
        np.testing.assert_allclose(atoms.positions, frames[k].positions, atol=1e-5)
        assert atoms.get_tags().tolist() == samples.oc20_tags(frames[k]).tolist()
        assert AtomicGraph.from_atoms(atoms, 5.0).fixed.tolist() == samples.fixed_mask(frames[k]).tolist()
    no_length = samples.write_pyg_lmdb(tmp_path / "b.lmdb", values[:2], with_length=False)
    with pytest.warns(UserWarning):
        assert len(_read(no_length, trusted=True)) == 2


def test_is2re_lmdb_labels_initial_structure_with_relaxed_energy(tmp_path, frames):
    values = [samples.pickle_legacy(samples.pyg_record(frames[i], i, is2re_relaxed=frames[-1])) for i in (0, 10)]
    path = samples.write_pyg_lmdb(tmp_path / "data.lmdb", values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        records = _read(path, trusted=True)
        assert _read(path, trusted=True, task="is2re")[1].info["y_init"] == pytest.approx(_raw(frames[10])[0])
        with pytest.raises(ValueError, match=r"frame 0, field 'y_relaxed': task='s2ef' needs S2EF labels"):
            _read(path, trusted=True, task="s2ef")
    first = records[0]
    assert first.info["task"] == "is2re" and first.get_potential_energy() == pytest.approx(-19.03837366)
    np.testing.assert_allclose(first.arrays["pos_relaxed"], frames[-1].positions, atol=1e-5)


def test_aselmdb_round_trip_and_older_encoding(tmp_path, frames):
    images = []
    for k, atoms in enumerate(frames[:4]):
        image = atoms.copy()
        image.calc = SinglePointCalculator(image, **atoms.calc.results)
        image.info.update(sid=SID, fid=k, ref_energy=REFERENCE)
        images.append(image)
    path = tmp_path / "oc20.aselmdb"
    assert aselmdb.write(path, images) == 4
    records = _read(path)
    assert [a.info["frame"] for a in records] == [1, 2, 3, 4] and records[2].info["fid"] == 2
    assert records[2].get_potential_energy() == pytest.approx(_raw(frames[2])[0] - REFERENCE)
    assert _read(path, referenced=False)[2].get_potential_energy() == pytest.approx(_raw(frames[2])[0])
    assert AtomicGraph.from_atoms(records[1], 5.0).fixed.sum() == 10 and records[1].get_tags()[-1] == 2
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:  # the layout: ids "1".., "nextid", zlib-compressed JSON rows with plain lists
        row = json.loads(zlib.decompress(txn.get(b"2")))
        assert json.loads(zlib.decompress(txn.get(b"nextid"))) == 5
    env.close()
    assert isinstance(row["positions"], list) and row["key_value_pairs"]["fid"] == 1
    assert row["constraints"][0]["name"] == "FixAtoms"
    # older fairchem files: ASE's jsonio encoding ({"__ndarray__": ...}), a deleted id
    old = tmp_path / "old.aselmdb"
    env = lmdb.open(str(old), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in (1, 3):
            row = aselmdb._row_dict(images[i], None)
            txn.put(str(i).encode(), zlib.compress(encode(row).encode()))
        txn.put(b"nextid", zlib.compress(b"4"))
        txn.put(b"deleted_ids", zlib.compress(b"[2]"))
    env.close()
    assert b"__ndarray__" in zlib.decompress(lmdb.open(str(old), subdir=False, readonly=True, lock=False)
                                              .begin().get(b"1"))
    old_records = _read(old)
    assert [a.info["frame"] for a in old_records] == [1, 3]
    assert old_records[1].get_potential_energy() == pytest.approx(_raw(frames[3])[0] - REFERENCE)


# ------------------------------------------------------------------------------------------- bad input


def _nan_force(text):
    lines = text.splitlines(keepends=True)
    cols = lines[4].split()
    cols[7] = "nan"
    lines[4] = " ".join(cols) + "\n"
    return "".join(lines)


def _unknown_element(text):
    lines = text.splitlines(keepends=True)
    lines[3] = "Xx" + lines[3][2:]
    return "".join(lines)


def _zero_volume(text):
    return re.sub(r'Lattice="[^"]*"', 'Lattice="10 0 0 10 0 0 0 0 30"', text, count=1)


def _no_energy(text):
    return re.sub(r" energy=\S+", "", text, count=1)


EXTXYZ_MUTATIONS = {
    "nan force": (_nan_force, "forces", "not finite"),
    "unknown element": (_unknown_element, "species", "unknown element 'Xx'"),
    "zero-volume cell": (_zero_volume, "cell", "zero volume"),
    "missing energy": (_no_energy, "energy", "missing"),
}


@pytest.mark.parametrize("case", list(EXTXYZ_MUTATIONS))
def test_malformed_s2ef_frame_is_named_or_skipped(tmp_path, frames, case):
    mutate, field, message = EXTXYZ_MUTATIONS[case]
    text = "".join(samples.extxyz_frame(a) if k != 2 else mutate(samples.extxyz_frame(a))
                   for k, a in enumerate(frames[:5]))
    (tmp_path / "0.extxyz").write_text(text)
    (tmp_path / "0.txt").write_text("".join(f"random{SID},frame{k},{REFERENCE}\n" for k in range(5)))
    with pytest.raises(ValueError, match=rf"file '0\.extxyz', frame 2, field '{field}': .*{message}"):
        _read(tmp_path)
    report = tmp_path / "skipped.tsv"
    kept = _read(tmp_path, skip_invalid=True, report=report)
    assert [a.info["fid"] for a in kept] == [0, 1, 3, 4]
    lines = report.read_text().splitlines()
    assert lines[1].split("\t")[:3] == ["0.extxyz", "2", field] and lines[-1] == "# skipped 1 of 5 records"


def test_malformed_lmdb_records_are_named_or_skipped(tmp_path, frames):
    short_tags = samples.pyg_record(frames[1], 1)
    short_tags.tags = short_tags.tags[:-3]
    values = _s2ef_pickles(frames[:1]) + [pickle.dumps(short_tags), b"not a pickle", *_s2ef_pickles(frames[3:4])]
    path = samples.write_pyg_lmdb(tmp_path / "data.lmdb", values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"file 'data\.lmdb', frame 1, field 'tags': shape \(14,\), expected"):
            _read(path, trusted=True)
        kept = _read(path, trusted=True, skip_invalid=True, report=tmp_path / "r.tsv")
    assert [a.info["frame"] for a in kept] == [0, 3]
    rows = [line.split("\t")[:3] for line in (tmp_path / "r.tsv").read_text().splitlines()[1:3]]
    assert rows == [["data.lmdb", "1", "tags"], ["data.lmdb", "2", "pickle"]]


def test_unknown_inputs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        oc20.read(tmp_path / "absent.extxyz")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="not an OC20 file kind"):
        oc20.read(tmp_path / "notes.md")
    with pytest.raises(ValueError, match="task must be one of"):
        oc20.read(tmp_path, task="s2efs")
