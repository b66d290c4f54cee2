"""Data-set plumbing of the accuracy part: which frames train, validate and test, in which units, and the
published column; all on the excerpts in tests/data (rMD17 ethanol split 01, acac, FitSNAP Ta)."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import units

from benchmarks import datasets, report, suite

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _repo_test_data(monkeypatch):
    monkeypatch.setenv("POTENTIALS_SHARED_DATA", str(DATA))


def _key(atoms) -> tuple:
    return tuple(np.round(atoms.positions, 6).reshape(-1))


def test_parse_datasets_selects_members_and_expands_bare_names():
    tasks = datasets.parse_datasets("rmd17:aspirin,ethanol,acac,ta:group,inp")
    assert [t.name for t in tasks] == ["rmd17-aspirin", "rmd17-ethanol", "acac", "ta-group", "inp-random", "inp-group"]
    assert [t.name for t in datasets.parse_datasets("rmd17")] == [f"rmd17-{m}" for m in datasets.RMD17_MOLECULES]
    acac = datasets.parse_datasets("acac")[0]
    assert acac.tests == ("test_MD_300K", "test_MD_600K") and not acac.stress
    ta = datasets.parse_datasets("ta:random")[0]
    assert ta.stress and ta.per_atom_energy
    assert [t.name for t in datasets.parse_datasets("quick")] == ["rmd17-aspirin", "acac", "ta-random"]
    # "periodic", the shared folder's name, is both periodic sets (with a member: that split of each)
    assert [t.name for t in datasets.parse_datasets("acac,periodic")] == ["acac", "ta-random", "ta-group",
                                                                           "inp-random", "inp-group"]
    assert [t.name for t in datasets.parse_datasets("periodic:group")] == ["ta-group", "inp-group"]
    with pytest.raises(ValueError, match="unknown rMD17 molecule 'aspirine'"):
        datasets.parse_datasets("rmd17:aspirine")
    with pytest.raises(ValueError, match="'toluene' is neither"):
        datasets.parse_datasets("acac,toluene")
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.parse_datasets("ta:sideways")


def test_rmd17_holds_out_50_validation_frames_of_train_01_and_tests_on_test_01():
    task = datasets.parse_datasets("rmd17:ethanol")[0]
    parts = datasets.split_frames(task)
    pool = datasets.rmd17_frames("ethanol", "train")
    assert len(pool) == 100  # the excerpt: frames 0-99 of train_01
    assert len(parts["val"]) == datasets.RMD17_VAL == 50 and len(parts["train"]) == 50
    train, val = {_key(a) for a in parts["train"]}, {_key(a) for a in parts["val"]}
    assert not train & val and train | val == {_key(a) for a in pool}
    assert len(parts["tests"]["test"]) == 20  # the whole test_01 excerpt
    assert not {_key(a) for a in parts["tests"]["test"]} & (train | val)
    # kcal/mol -> eV, as rMD17 stores energies and forces in kcal/mol
    raw = np.load(DATA / "rmd17" / "npz" / "rmd17_ethanol_test_01.npz")
    first = parts["tests"]["test"][0]
    assert first.get_potential_energy() == pytest.approx(raw["energies"][0] * units.kcal / units.mol)
    assert np.allclose(first.get_forces(), raw["forces"][0] * 0.0433641, rtol=1e-5)
    assert list(first.numbers) == list(raw["nuclear_charges"])
    again = datasets.split_frames(task)
    assert [_key(a) for a in again["val"]] == [_key(a) for a in parts["val"]]  # fixed seed


def test_acac_trains_at_300k_and_tests_at_300k_and_600k(tmp_path):
    task = datasets.parse_datasets("acac")[0]
    paths = datasets.write_task(task, tmp_path)
    assert paths["sizes"] == {"train": 10, "val": 50, "test_MD_300K": 10, "test_MD_600K": 10}
    hot = ase.io.read(paths["tests"]["test_MD_600K"], index=":")
    src = ase.io.read(DATA / "acac" / "test_MD_600K.xyz", index=":")
    assert np.allclose(hot[3].get_forces(), src[3].get_forces())
    assert hot[3].get_potential_energy() == pytest.approx(src[3].get_potential_energy())
    assert len(hot[0]) == 15


def test_periodic_random_split_is_80_10_10_and_keeps_stress(tmp_path):
    task = datasets.parse_datasets("ta:random")[0]
    paths = datasets.write_task(task, tmp_path)
    assert paths["sizes"] == {"train": 24, "val": 3, "test": 3}
    frames = {s: ase.io.read(p, index=":") for s, p in (("train", paths["train"]), ("val", paths["val"]),
                                                        ("test", paths["tests"]["test"]))}
    keys = [{_key(a) for a in f} for f in frames.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    src = {_key(a): a for a in ase.io.read(DATA / "periodic" / "Ta_Linear_JCP2014.extxyz", index=":")}
    for atoms in frames["test"]:
        ref = src[_key(atoms)]
        assert np.allclose(atoms.get_stress(), ref.get_stress())
        # ASE sign: stress = -raw_bar * 1e-4 GPa/bar / 160.2 GPa per eV/Å³
        raw = np.asarray(ref.info["raw_stress_bar"], dtype=float).reshape(3, 3)
        assert atoms.get_stress(voigt=False)[0, 0] == pytest.approx(-raw[0, 0] * 1e-4 / 160.21766, rel=1e-4)


def test_group_split_holds_whole_config_types_out_of_training():
    task = datasets.parse_datasets("ta:group")[0]
    parts = datasets.split_frames(task)
    held = parts["notes"]["held_out_groups"]
    assert held and all(a.info["config_type"] in held for a in parts["tests"]["test"])
    assert not any(a.info["config_type"] in held for a in parts["train"] + parts["val"])
    assert len(parts["tests"]["test"]) >= 0.1 * 30
    assert len(parts["train"]) + len(parts["val"]) + len(parts["tests"]["test"]) == 30
    # synthetic groups: test reaches 10 % with whole groups, one group always trains
    groups = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5
    tr, va, te, names = datasets.group_split(groups)
    assert len(te) >= 10 and set(np.asarray(groups)[te]) == set(names) and len(names) < 4
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="at least two"):
        datasets.group_split(["a"] * 5)


def test_missing_group_label_names_file_frame_and_field(tmp_path, monkeypatch):
    frames = ase.io.read(DATA / "periodic" / "Ta_Linear_JCP2014.extxyz", index=":")
    del frames[4].info["config_type"]
    (tmp_path / "periodic").mkdir()
    ase.io.write(tmp_path / "periodic" / "Ta_Linear_JCP2014.extxyz", frames, format="extxyz")
    monkeypatch.setenv("POTENTIALS_SHARED_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"Ta_Linear_JCP2014.extxyz: frame 4 has no config_type"):
        datasets.split_frames(datasets.parse_datasets("ta:group")[0])
    with pytest.raises(FileNotFoundError, match="rmd17_ethanol_train_01.npz"):
        datasets.split_frames(datasets.parse_datasets("rmd17:ethanol")[0])


def _record(label, framework, dataset, f_curve, tests=("test",)):
    curve = [{"elapsed_s": t, "steps": k + 1, "epoch": 1, "test_f_mae_meV_A": f, "test_e_mae_meV": 1.0,
              "val_f_mae_meV_A": 0.9 * f,
              "sets": {name: {"e_mae_meV": 1.0, "e_mae_meV_atom": 0.1, "f_mae_meV_A": f} for name in tests}}
             for k, (t, f) in enumerate(f_curve)]
    return {"label": label, "framework": framework, "dataset": dataset, "tests": list(tests), "stress": False,
            "per_atom_energy": False, "sizes": {"train": 950, "val": 50, "test": 1000}, "notes": {"source": "x"},
            "result": {"model": {"n_params": 10}, "lr": 0.01, "steps": 9, "epochs": 1, "curve": curve}}


def test_published_column_and_ratios_to_mace_at_equal_time(tmp_path):
    assert datasets.published_force_mae("rmd17-aspirin") == 6.6
    assert all(datasets.published_force_mae(f"rmd17-{m}") for m in datasets.RMD17_MOLECULES)
    assert datasets.published_force_mae("acac") is None
    mace = _record("mace-64", "mace", "rmd17-aspirin", [(10.0, 100.0), (40.0, 25.0)])
    ours = _record("egnn-64", "ours", "rmd17-aspirin", [(10.0, 200.0), (40.0, 50.0)])
    table = report.dataset_table([mace, ours])
    assert "| MACE, published |" in table and "6.6" in table
    # the published value sits under the test set's force column; the validation column shows the last point
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ")]
    header, published = lines[0], lines[-1]
    egnn = next(line for line in lines if line[0] == "egnn-64")
    assert published[header.index("F MAE meV/Å")] == "6.6"
    assert egnn[header.index("val F MAE meV/Å")] == "45" and egnn[header.index("F MAE meV/Å")] == "50"
    assert "published" not in report.dataset_table([{**mace, "dataset": "acac"}])
    # both curves fall as 1/t: twice MACE's error at every time, interpolated in log-log between the points
    rows = report.equal_time_ratios([mace, ours], [10.0, 20.0, 40.0])
    assert rows[0][:3] == ["egnn-64", "ours", "mace-64"] and rows[0][3:] == pytest.approx([2.0, 2.0, 2.0])
    sections = report.dataset_sections([mace, ours], 40.0, tmp_path, "accuracy", eval_points=3)
    assert sections[0][0] == "Targets" and sections[1][0].startswith("rmd17-aspirin")
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_targets_name_the_best_model_and_the_margin():
    mace = _record("mace-64", "mace", "rmd17-aspirin", [(10.0, 100.0), (40.0, 50.0)])
    egnn = _record("egnn-64", "ours", "rmd17-aspirin", [(10.0, 90.0), (40.0, 45.0)])
    facet = _record("facet-64-l2", "ours", "rmd17-aspirin", [(10.0, 80.0), (40.0, 42.0)])
    peer = _record("nequip-s", "nequip", "rmd17-aspirin", [(10.0, 10.0), (40.0, 5.0)])
    acac = [_record("mace-64", "mace", "acac", [(40.0, 10.0)]), _record("egnn-64", "ours", "acac", [(40.0, 12.0)])]
    table = report.targets_table({"rmd17-aspirin": [mace, egnn, facet, peer], "acac": acac})
    lines = [line for line in table.splitlines() if line.startswith("| ") and "target" not in line]
    assert table.startswith("1 of 3 met")
    # the peer's lower error does not count: the best model here is Facet at 0.84 of MACE
    assert lines[0].split(" | ")[1:3] == ["rmd17-aspirin", "facet-64-l2"] and lines[0].endswith("| met |")
    assert "Facet ≤ 0.8 × MACE" in lines[1] and lines[1].endswith("| missed by 5% |")
    assert lines[2].split(" | ")[1:3] == ["acac", "egnn-64"] and lines[2].endswith("| missed by 20% |")
    assert report.targets_table({"acac": acac[1:]}) == ""  # no MACE cell: nothing to judge
    # a set whose planned models are not all measured yet gets a provisional verdict, met or not
    partial = report.targets_table({"rmd17-aspirin": [mace, egnn, facet], "acac": acac},
                                   pending={"acac": ["facet-64-l2", "eqv2-64-l2"]})
    assert partial.startswith("1 of 3 met")
    assert partial.splitlines()[-1].endswith(
        "| missed by 20% (so far: facet-64-l2, eqv2-64-l2 not measured yet) |")
    assert "so far" not in "".join(partial.splitlines()[:-1])


def test_resume_keeps_finished_cells_and_trains_the_rest(tmp_path, monkeypatch):
    """A long accuracy run done in pieces: finished (data set, model) cells of the same settings are taken over,
    failed or differently-configured ones are trained again, and the raw report is saved after every cell."""
    import benchmarks.__main__ as bench
    from benchmarks import structures, suite

    monkeypatch.setattr(structures, "CACHE_DIR", tmp_path / "cache")
    trained: list[str] = []

    def fake_record(framework, label, request, settings, timeout):
        trained.append(label)
        return {"label": label, "framework": framework, "result": {"budget": request["budget_s"]}}

    monkeypatch.setattr(bench, "_record", fake_record)
    settings = suite.Settings.make(False, models=("egnn-64", "facet-64"), budget_s=30.0, threads=1)
    tasks = datasets.parse_datasets("rmd17:ethanol")
    saved: list[int] = []
    first = bench.run_datasets(settings, tasks, save=lambda recs: saved.append(len(recs)))
    assert trained == ["egnn-64", "facet-64"] and saved == [1, 2]
    assert all(r["cell_key"] and r["dataset"] == "rmd17-ethanol" for r in first)

    # the same settings: nothing is trained again; a failed cell is
    trained.clear()
    failed = [first[0], {k: v for k, v in first[1].items() if k != "result"} | {"error": "killed"}]
    again = bench.run_datasets(settings, tasks, previous=failed)
    assert trained == ["facet-64"] and again[0] is first[0]

    # the report of a run in pieces lists the cells still to train
    planned = [["rmd17-ethanol", "egnn-64"], ["rmd17-ethanol", "facet-64"], ["acac", "egnn-64"]]
    assert bench.pending_cells(planned, failed) == [["rmd17-ethanol", "facet-64"], ["acac", "egnn-64"]]

    # another budget is another measurement: every cell is trained
    trained.clear()
    longer = suite.Settings.make(False, models=("egnn-64", "facet-64"), budget_s=60.0, threads=1)
    bench.run_datasets(longer, tasks, previous=first)
    assert trained == ["egnn-64", "facet-64"]


def test_jobs_train_cells_side_by_side_and_keep_the_planned_order(tmp_path, monkeypatch):
    """--jobs 2: two cells are in their workers at the same time (a two-party barrier would time out otherwise);
    records and saves follow the planned order although the second cell finishes first."""
    import threading
    import time

    import benchmarks.__main__ as bench
    from benchmarks import structures, suite

    monkeypatch.setattr(structures, "CACHE_DIR", tmp_path / "cache")
    both_running = threading.Barrier(2, timeout=20)

    def fake_record(framework, label, request, settings, timeout):
        both_running.wait()
        if label == "egnn-64":
            time.sleep(0.3)
        return {"label": label, "framework": framework, "result": {}}

    monkeypatch.setattr(bench, "_record", fake_record)
    settings = suite.Settings.make(False, models=("egnn-64", "facet-64"), budget_s=30.0, threads=1, jobs=2)
    saved: list[list[str]] = []
    records = bench.run_datasets(settings, datasets.parse_datasets("rmd17:ethanol"),
                                 save=lambda recs: saved.append([r["label"] for r in recs]))
    assert [r["label"] for r in records] == ["egnn-64", "facet-64"]
    assert saved == [["facet-64"], ["egnn-64", "facet-64"]]


def test_recipe_changes_our_models_only_and_the_seed_every_model():
    """--recipe (tuning on the validation split) reaches this project's models, never the peers; --seed all;
    without either the request is the one earlier reports' cells were keyed by."""
    from benchmarks.__main__ import _train_request

    assert suite.parse_recipe("lr=3e-3, ema_decay=0.999,stage_two=false,batch_size=8") == {
        "lr": 3e-3, "ema_decay": 0.999, "stage_two": False, "batch_size": 8}
    with pytest.raises(ValueError, match="'warmup=3'.*one of"):
        suite.parse_recipe("warmup=3")
    with pytest.raises(ValueError, match="'lr=fast'.*not a valid float"):
        suite.parse_recipe("lr=fast")
    base = suite.Settings.make(False)
    tuned = suite.Settings.make(False, recipe=suite.parse_recipe("lr=3e-3,stage_two_lr=5e-4"), seed=2)
    cfg = suite.OURS_MODELS["egnn-64"]
    plain = _train_request(base, "egnn-64", cfg, "ours")
    assert plain["lr"] == 5e-3 and plain["seed"] == 0 and "stage_two_lr" not in plain
    ours = _train_request(tuned, "egnn-64", cfg, "ours")
    assert ours["lr"] == 3e-3 and ours["stage_two_lr"] == 5e-4 and ours["seed"] == 2
    peer = _train_request(tuned, "mace-64", suite.MACE_MODELS["mace-64"], "mace")
    assert "lr" not in peer and "stage_two_lr" not in peer and peer["seed"] == 2
