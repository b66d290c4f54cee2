"""The graph store: records equal in-memory graphs, resumable conversion, corruption and bad-record reports,
training through the data module, and streaming statistics."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from torch_geometric.data import Batch

from potentials.cli.main import main as cli_main
from potentials.datasets import ase_files, emt, md17, stats, store
from potentials.datasets.collate import PackedBatch, batch_graphs
from potentials.datasets.datamodule import AtomsDataModule
from potentials.datasets.preprocess import conversion_progress, convert
from potentials.datasets.store import GraphStore, StoreDataset, StoreError
from potentials.graph import AtomicGraph

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("pos", "z", "cell", "pbc", "edge_index", "cell_offsets", "energy", "forces", "stress", "has_energy",
          "has_forces", "has_stress", "fixed", "tags", "num_atoms")


def slow_md17(path: str, n: int, delay: float):
    """The first ``n`` MD17 frames, one every ``delay`` seconds (a conversion slow enough to be killed midway)."""
    for atoms in md17.read(path, indices=np.arange(n)):
        time.sleep(delay)
        yield atoms


def _assert_same_graph(got: AtomicGraph, want: AtomicGraph, atol: float = 0.0) -> None:
    for key in FIELDS:
        a, b = getattr(got, key), getattr(want, key)
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.allclose(a.double(), b.double(), atol=atol, rtol=0, equal_nan=True), key


def _edge_set(g: AtomicGraph) -> set:
    return {(int(j), int(i), *map(int, o)) for (j, i), o in zip(g.edge_index.T, g.cell_offsets, strict=True)}


def test_records_equal_graphs_built_in_memory(test_data, tmp_path):
    """MPtrj (stress), OC20 (fixed atoms) and MD17 (molecules) frames come back field for field, float64 exact."""
    files = [test_data / "mptrj" / "mptrj_10_thin_systems.db",
             test_data / "oc20" / "oc20_is2res_random1447590.traj"]
    molecules = md17.read(test_data / "md17" / "md17_ethanol_first2000.npz", indices=[0, 7])
    frames = [a for f in files for a in ase_files.read(f)] + molecules
    manifest = convert(lambda: iter(frames), tmp_path / "s", cutoff=5.0, dtype="float64", search_paths=files)
    assert manifest["complete"] and manifest["num_records"] == len(frames) == 11 + 47 + 2
    assert {s["name"]: s["sha256"] for s in manifest["sources"]}["oc20_is2res_random1447590.traj"] == (
        "8cf460e6574312acb7bf5fc43d8a39e2168dd48ec969ea5dceddd7db6b1ec86a")
    ds = StoreDataset(tmp_path / "s", dtype="float64")
    for k in (0, 3, 11, 40, 58, 59):
        _assert_same_graph(ds[k], AtomicGraph.from_atoms(frames[k], 5.0, dtype=torch.float64))
    assert bool(ds[0].has_stress) and bool(ds[11].fixed.any()) and not bool(ds[58].pbc.any())
    info = ds.store.info(12)
    assert info["source"] == "oc20_is2res_random1447590.traj" and info["frame"] == 1 and info["index"] == 12
    assert ds.store.verify() == len(frames)

    # float32 store: positions rounded to float32, the total energy kept in float64
    convert(lambda: iter(frames), tmp_path / "s32", cutoff=5.0, dtype="float32")
    g = StoreDataset(tmp_path / "s32", dtype="float64")[11]
    assert float(g.energy) == frames[11].get_potential_energy()
    _assert_same_graph(g, AtomicGraph.from_atoms(frames[11], 5.0, dtype=torch.float64), atol=1e-5)


def test_smaller_cutoff_filters_stored_edges_and_edgeless_stores_build_them(test_data, tmp_path):
    frames = ase_files.read(test_data / "mptrj" / "mptrj_10_thin_systems.db")
    convert(lambda: frames, tmp_path / "e6", cutoff=6.0, dtype="float64")
    convert(lambda: frames, tmp_path / "bare", cutoff=6.0, dtype="float64", edges=False)
    assert json.loads((tmp_path / "bare" / "manifest.json").read_text())["edges"] is False
    at5 = StoreDataset(tmp_path / "e6", cutoff=5.0, dtype="float64")
    bare = StoreDataset(tmp_path / "bare", cutoff=5.0, dtype="float64")
    for k in (0, 5):
        want = AtomicGraph.from_atoms(frames[k], 5.0, dtype=torch.float64)
        _assert_same_graph(bare[k], want)
        assert _edge_set(at5[k]) == _edge_set(want) and len(_edge_set(want)) < at5.store.read(k)["edge_index"].shape[1]
    with pytest.raises(StoreError, match=r"holds edges up to 6.0 Å but cutoff=7.0 Å.*rebuild"):
        StoreDataset(tmp_path / "e6", cutoff=7.0)


def test_preprocess_cli_and_datamodule_match_the_in_memory_path(tmp_path, monkeypatch):
    """`potentials preprocess emt` → data module with the same splits, statistics and batches; stats cached."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "emt_store"
    assert cli_main(["preprocess", "emt", str(out), f"data_root={tmp_path / 'data'}", "source.n_structures=24",
                     "cutoff=4.5", "dtype=float64"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_records"] == 24 and manifest["cutoff"] == 4.5 and manifest["dtype"] == "float64"
    assert manifest["sources"][0]["sha256"] and "source.n_structures=24" in manifest["command"]

    split = {"val": 4, "test": 4, "seed": 1}
    memory = AtomsDataModule(partial(emt.read, n_structures=24, root=tmp_path / "data"), 4.5, split=split,
                             batch_size=4, dtype="float64")
    disk = AtomsDataModule(dataset=StoreDataset(out, dtype="float64"), split=split, batch_size=4, dtype="float64",
                           num_workers=2)
    memory.setup()
    disk.setup()
    for name in ("train", "val", "test"):
        assert np.array_equal(memory.indices[name], disk.indices[name])
    a, b = memory.stats, disk.stats
    assert a.elements == b.elements and a.num_atoms == b.num_atoms
    assert np.allclose([a.force_rms, a.avg_num_neighbors, *a.atomic_energies.values()],
                       [b.force_rms, b.avg_num_neighbors, *b.atomic_energies.values()], rtol=1e-10)
    batches = [next(iter(dm.train_dataloader())) for dm in (memory, disk)]  # 2 workers read the store
    assert torch.equal(batches[0].energy, batches[1].energy) and torch.equal(batches[0].pos, batches[1].pos)

    assert len(list((out / "cache").glob("stats-*.json"))) == 1
    monkeypatch.setattr(store, "compute_stats", lambda graphs: pytest.fail("statistics recomputed"))
    again = AtomsDataModule(dataset=StoreDataset(out, dtype="float64"), split=split)
    assert again.stats.atomic_energies == b.atomic_energies

    grouped = AtomsDataModule(dataset=StoreDataset(out), split={"val": 1, "test": 1, "group_by": "config_type"})
    grouped.setup()
    kinds = {n: {grouped.graphs.store.info(int(i))["config_type"] for i in grouped.indices[n]} for n in
             ("train", "val", "test")}
    assert sum(len(k) for k in kinds.values()) == 3, kinds  # every kind (bulk, slab, vacancy) in one split only


def test_conversion_killed_midway_resumes_with_every_record_exactly_once(test_data, tmp_path):
    md17_file = test_data / "md17" / "md17_ethanol_first2000.npz"
    config = tmp_path / "slow.yaml"
    config.write_text(f"name: slow\npath: {md17_file}\nsource:\n  _target_: tests.test_store.slow_md17\n"
                      "  _partial_: true\n  path: ${..path}\n  n: 200\n  delay: 0.01\n")
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "potentials.cli.main", "preprocess", str(config), str(out), "cutoff=4.0",
           "--commit-every", "16"]

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while (conversion_progress(out) or {}).get("consumed", 0) < 70:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    time.sleep(0.03)  # land between two commits
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert 0 < conversion_progress(out)["written"] < 200
    with pytest.raises(StoreError, match=r"incomplete.*Rerun the same command.*potentials preprocess .*slow.yaml"):
        StoreDataset(out)

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr
    ds = StoreDataset(out)
    assert len(ds) == 200 and ds.store.manifest["complete"]
    infos = [info for _, info in ds.store.iter_info()]
    assert [i["index"] for i in infos] == list(range(200))
    assert len({(i["source"], i["frame"]) for i in infos}) == 200
    want = md17.read(md17_file, indices=np.arange(200))
    for k in (0, 69, 70, 71, 72, 199):
        assert np.allclose(ds[k].pos.numpy(), want[k].positions, atol=1e-5)
        assert np.isclose(float(ds.store.read(k)["energy"][0]), want[k].get_potential_energy(), rtol=0, atol=1e-9)


def _labelled(atoms: ase.Atoms, seed: int) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    atoms.calc = SinglePointCalculator(atoms, energy=-3.0 * len(atoms), forces=rng.normal(size=(len(atoms), 3)))
    return atoms


def test_bad_records_stop_with_file_frame_field_or_are_skipped_and_listed(tmp_path):
    good = [_labelled(ase.Atoms("Cu4", positions=np.eye(4, 3) * 2.5 + 1, cell=[6, 6, 6], pbc=True), k)
            for k in range(4)]
    twin = _labelled(ase.Atoms("Cu2", positions=[[1, 1, 1], [1, 1, 1.01]], cell=[6, 6, 6], pbc=True), 9)
    dummy = _labelled(ase.Atoms("CuX", positions=[[1, 1, 1], [3, 1, 1]], cell=[6, 6, 6], pbc=True), 8)
    path = tmp_path / "bad.extxyz"
    ase.io.write(path, [good[0], twin, good[1], dummy, good[2], good[3]])
    source, out = partial(ase_files.read, path), tmp_path / "s"

    with pytest.raises(ValueError, match=r"file 'bad.extxyz', frame 1, field 'positions'.*--skip-invalid"):
        convert(source, out, cutoff=4.0, search_paths=[path])
    with pytest.raises(StoreError, match="incomplete"):
        GraphStore(out)
    assert conversion_progress(out)["written"] == 1

    original = path.read_bytes()
    path.write_bytes(original.replace(b"-12.0", b"-13.0", 1))
    with pytest.raises(StoreError, match=r"bad.extxyz is missing or changed since the conversion"):
        convert(source, out, cutoff=4.0, search_paths=[path])
    path.write_bytes(original)
    with pytest.raises(StoreError, match=r"other settings \(cutoff: stored 4.0, now 5.0\)"):
        convert(source, out, cutoff=5.0, search_paths=[path])

    manifest = convert(source, out, cutoff=4.0, search_paths=[path], skip_invalid=True)
    assert manifest["num_records"] == 4 and manifest["num_skipped"] == 2
    listed = manifest["skipped"]
    assert [s["index"] for s in listed] == [1, 3]
    assert "field 'positions'" in listed[0]["error"] and "field 'numbers'" in listed[1]["error"]
    assert [GraphStore(out).info(k)["frame"] for k in range(4)] == [0, 2, 4, 5]


def test_corrupted_record_and_manifest_are_reported_with_the_rebuild_command(tmp_path):
    frames = emt.generate(seed=2, n_structures=6)
    out = tmp_path / "s"
    convert(lambda: frames, out, cutoff=4.0, command="potentials preprocess emt s")
    ds = StoreDataset(out)
    raw = bytes(ds.store._handles()[0].get(store.record_key(3), db=ds.store._handles()[1][b"records"]))
    needle = raw[40:56]  # positions of record 3
    data = bytearray((out / "data.mdb").read_bytes())
    assert data.count(needle) == 1
    at = data.index(needle) + 3
    data[at] ^= 0xFF
    with open(out / "data.mdb", "r+b") as fh:
        fh.seek(at)
        fh.write(bytes([data[at]]))
    ds[2]
    with pytest.raises(StoreError, match=r"corrupted \(record 3: checksum mismatch\).*`potentials preprocess emt s`"):
        ds[3]
    with pytest.raises(StoreError, match="record 3: checksum mismatch"):
        ds.store.verify()

    manifest_file = out / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "num_records": 5}))
    with pytest.raises(StoreError, match=r"manifest.json is corrupted \(its checksum.*--overwrite"):
        StoreDataset(out)
    manifest_file.write_text(json.dumps(manifest)[:-40])
    with pytest.raises(StoreError, match=r"manifest.json is corrupted \(it does not parse"):
        StoreDataset(out)
    store.write_manifest(out, {**manifest, "num_records": 5})  # a valid manifest that disagrees with the data
    with pytest.raises(StoreError, match="corrupted .it holds 6 records, its manifest says 5"):
        StoreDataset(out)


def test_streaming_least_squares_matches_a_direct_fit():
    graphs = [AtomicGraph.from_atoms(a, 4.0) for a in emt.generate(seed=5, n_structures=30)]
    direct = stats.compute_stats(graphs)
    counts = np.stack([np.bincount(g.z.numpy(), minlength=119)[direct.elements] for g in graphs])
    e0, rmse = stats.fit_atomic_energies(counts, np.array([float(g.energy) for g in graphs]), direct.elements)
    assert np.allclose(list(direct.atomic_energies.values()), list(e0.values()), rtol=1e-9)
    assert np.isclose(direct.energy_rmse_after_refs, rmse, rtol=1e-9)
    fit = stats.StreamingLeastSquares(3, block=7)  # several block updates
    rng = np.random.default_rng(0)
    a, x = rng.normal(size=(40, 3)), np.array([1.0, -2.0, 0.5])
    for row, b in zip(a, a @ x, strict=True):
        fit.add(row, b)
    r = fit.factor()
    assert np.allclose(np.linalg.lstsq(r[:, :3], r[:, 3], rcond=None)[0], x)


def test_fast_batches_equal_pyg_batches_and_survive_the_trip_from_a_worker(test_data):
    frames = ase_files.read(test_data / "oc20" / "oc20_is2res_random1447590.traj")[:3] + md17.read(
        test_data / "md17" / "md17_ethanol_first2000.npz", indices=[1, 2])
    graphs = [AtomicGraph.from_atoms(a, 5.0) for a in frames]
    want = Batch.from_data_list(graphs)
    for got in (batch_graphs(graphs), pickle.loads(pickle.dumps(PackedBatch(batch_graphs(graphs))))):
        assert type(got) is type(want) and list(got.keys()) == list(want.keys()) and got.num_graphs == 5
        for key in want.keys():
            assert got[key].dtype == want[key].dtype
            assert torch.allclose(got[key].double(), want[key].double(), rtol=0, atol=0, equal_nan=True), key
        for table in ("_slice_dict", "_inc_dict"):
            assert list(getattr(got, table)) == list(getattr(want, table))
            assert all(torch.equal(getattr(got, table)[k], getattr(want, table)[k]) for k in getattr(want, table))
        _assert_same_graph(got.to_data_list()[3], graphs[3])
