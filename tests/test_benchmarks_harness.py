"""The benchmark harness parts that work without peer venvs: worker protocol, tables, structures, timers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import units

from benchmarks import neighbors_bench, peers, report, structures, suite

sys.path.insert(0, str(Path(peers.WORKER_DIR)))
import _common  # noqa: E402  (worker helpers live beside the workers, outside any package)


@pytest.fixture(autouse=True)
def _repo_test_data(monkeypatch):
    """The harness reads real frames from a data folder; the tests point it at the samples in tests/data."""
    monkeypatch.setenv("POTENTIALS_SHARED_DATA", str(Path(__file__).resolve().parent / "data"))


def test_parse_worker_output_takes_last_json_line_among_noise():
    out = 'warning: {not json}\n{"a": 1}\nsome log line\n{"task": "infer", "results": []}\n'
    assert peers.parse_worker_output(out) == {"task": "infer", "results": []}


def test_parse_worker_output_reports_worker_error_and_missing_result():
    with pytest.raises(peers.PeerError, match="boom"):
        peers.parse_worker_output('{"error": "ValueError: boom"}')
    with pytest.raises(peers.PeerError, match="no JSON result"):
        peers.parse_worker_output("Traceback ...\nKeyError: 'x'\n")


def test_read_request_accepts_argv_json_and_file(tmp_path):
    req = {"task": "infer", "steps": 3}
    assert _common.read_request(["w", json.dumps(req)]) == req
    path = tmp_path / "req.json"
    path.write_text(json.dumps(req))
    assert _common.read_request(["w", str(path)]) == req
    with pytest.raises(ValueError, match="task"):
        _common.read_request(["w", '{"steps": 3}'])


def test_venv_marker_decides_readiness(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "VENV_ROOT", tmp_path)
    assert not peers.is_ready("mace")
    (tmp_path / "mace" / "bin").mkdir(parents=True)
    (tmp_path / "mace" / "bin" / "python").write_text("")
    marker = {"peer": "mace", "pins": peers.PEERS["mace"].pins}
    (tmp_path / "mace" / peers.MARKER).write_text(json.dumps(marker))
    assert peers.is_ready("mace")
    (tmp_path / "mace" / peers.MARKER).write_text(json.dumps({**marker, "pins": ["torch==2.0.0"]}))
    assert not peers.is_ready("mace")
    with pytest.raises(peers.PeerError, match="unknown peer"):
        peers.is_ready("no-such-peer")


def test_pins_put_torch_first_and_keep_it_fixed():
    for spec in peers.PEERS.values():
        assert spec.pins[0] == "torch==2.13.0"
        assert all("==" in p for p in spec.pins if not p.startswith("ase"))


def _infer_record(label, framework, structure, atom_steps, dtype="float32"):
    entry = _common.infer_entry(structure, 64, 1792, [0.001], [64 / atom_steps], [0.002 + 64 / atom_steps], -1.0)
    return {"label": label, "framework": framework,
            "result": {"dtype": dtype, "model": {"n_params": 10}, "results": [entry]}}


def test_infer_entry_rates_are_consistent():
    e = _common.infer_entry("si64", 64, 1792, [0.01, 0.03, 0.02], [0.1, 0.3, 0.2], [0.4, 0.5, 0.6], -1.0)
    assert e["model_ms"] == pytest.approx(200.0)
    assert e["steps_per_s"] == pytest.approx(5.0)
    assert e["atom_steps_per_s"] == pytest.approx(320.0)
    assert e["steps_per_s_with_graph"] == pytest.approx(2.0)


def test_infer_table_ratios_against_reference_and_lists_failures():
    records = [_infer_record("mace-64", "mace", "si64", 100.0), _infer_record("egnn-64", "ours", "si64", 250.0),
               {"label": "escn", "framework": "fairchem", "error": "fairchem worker exited with 1\nTraceback"}]
    table = report.infer_table(records, reference="mace-64")
    lines = [ln for ln in table.splitlines() if ln.startswith("| egnn-64")]
    assert lines and lines[0].rstrip(" |").endswith("2.5")
    assert "escn (fairchem): fairchem worker exited with 1" in table
    assert "Traceback" not in table


def test_rounds_are_merged_into_medians():
    """Three rounds of two models: rates from the median round, the least step time, every round's median."""
    records = []
    for round_index, (mace, egnn) in enumerate([(100.0, 250.0), (50.0, 400.0), (110.0, 240.0)]):
        records += [{**_infer_record("mace-64", "mace", "si64", mace), "round": round_index},
                    {**_infer_record("egnn-64", "ours", "si64", egnn), "round": round_index}]
    merged = {r["label"]: r for r in report.merge_rounds(records)}
    assert merged["mace-64"]["rounds"] == 3
    mace = merged["mace-64"]["result"]["results"][0]
    assert mace["atom_steps_per_s"] == pytest.approx(100.0)  # median of 640, 1280, 582 ms per step: 640 ms
    assert mace["model_ms_min"] == pytest.approx(64e3 / 110.0)
    assert len(mace["round_model_ms"]) == 3
    table = report.infer_table(records, reference="mace-64")
    egnn_rows = [ln for ln in table.splitlines() if ln.startswith("| egnn-64")]
    assert len(egnn_rows) == 1 and "| 2.5 |" in egnn_rows[0]  # 250 (the median round) over 100
    assert "model ms of each round" in table
    # a single round keeps the plain table
    assert "each round" not in report.infer_table(records[:2], reference="mace-64")
    # ratios within each round: 250/100, 400/50, 240/110 (mace's ms over egnn's), median 2.5
    paired = report.paired_ratios_table(records, references=("mace-64",))
    row = [ln for ln in paired.splitlines() if ln.startswith("| egnn-64")]
    assert len(row) == 1 and "| 2.5, 8, 2.18 | 2.5 |" in row[0], paired
    assert not [ln for ln in paired.splitlines() if ln.startswith("| mace-64")]  # not against itself
    assert report.paired_ratios_table(records[:2], references=("mace-64",)) == ""  # one round: nothing to pair


def test_markdown_report_has_run_facts(tmp_path):
    path = report.write_markdown(tmp_path / "r.md", {"command": "python -m benchmarks run --quick", "threads": 2},
                                 [("Inference", report.markdown_table(["a", "b"], [[1, 2.34567]]))])
    text = path.read_text()
    assert "python -m benchmarks run --quick" in text and "**threads**: 2" in text
    assert "| 1 | 2.35 |" in text
    assert report.report_name("infer") == "infer" and report.report_name("train") == "train"
    assert report.report_name("infer", ("float64",)) == "infer-float64"
    assert report.report_name("infer", ("float32", "float64")) == "infer"
    assert report.report_name("infer", ("float32",), "nequip") == "infer-nequip"


def test_each_part_is_written_under_its_fixed_name_with_the_run_date(tmp_path):
    """A run of two parts writes infer.md/.png and neighbors.md/.png; a later run replaces only its part."""
    from benchmarks.__main__ import write

    machine = {"host": "h", "cpu": "c", "cores": 2, "memory_GB": 1, "platform": "p", "load_avg_1_5_15": [0, 0, 0]}
    meta = {"start": "2026-01-02T03:04:05", "command": "python -m benchmarks run", "machine_start": machine,
            "settings": {"threads": 2, "omp_wait_policy": "PASSIVE", "dtypes": ["float32"], "budget_s": 60}}
    infer = [_infer_record("mace-64", "mace", "si64", 100.0), _infer_record("egnn-64", "ours", "si64", 250.0)]
    neighbors = [{"n_atoms": 2, "n_edges": 84, "ours_ms": 0.2, "ase_ms": 30.0},
                 {"n_atoms": 32, "n_edges": 1344, "ours_ms": 0.9, "ase_ms": 70.0}]
    written = write({"meta": meta, "records": {"infer": infer, "neighbors": neighbors}}, tmp_path)
    assert sorted(p.name for p in written) == ["infer.md", "neighbors.md"]
    text = (tmp_path / "infer.md").read_text()
    assert "2026-01-02 03:04" in text and "![throughput](infer.png)" in text and "Neighbour" not in text
    assert (tmp_path / "infer.png").exists() and (tmp_path / "neighbors.png").exists()
    meta64 = {**meta, "start": "2026-01-03T00:00:00", "settings": {**meta["settings"], "dtypes": ["float64"]}}
    (written,) = write({"meta": meta64, "records": {"infer": infer}}, tmp_path)
    assert written.name == "infer-float64.md" and "2026-01-02 03:04" in (tmp_path / "infer.md").read_text()


def test_plots_are_written(tmp_path):
    records = [_infer_record("mace-64", "mace", "si64", 100.0), _infer_record("egnn-64", "ours", "si64", 250.0)]
    assert report.plot_throughput(records, tmp_path / "t.png").stat().st_size > 1000
    rows = [{"n_atoms": 2, "n_edges": 84, "ours_ms": 0.2, "ase_ms": 30.0},
            {"n_atoms": 32, "n_edges": 1344, "ours_ms": 0.9, "ase_ms": 70.0}]
    assert report.plot_neighbors(rows, tmp_path / "n.png").stat().st_size > 1000
    assert "| 2 | 84 | 0.2 | 30 | 150 |" in report.neighbors_table(rows)


def test_structures_are_deterministic_and_physical():
    si, si_again = structures.si64(), structures.si64()
    assert len(si) == 64 and np.array_equal(si.positions, si_again.positions)
    d = si.get_all_distances(mic=True)
    nearest = np.sort(d, axis=1)[:, 1]
    assert np.allclose(nearest, 5.43 * np.sqrt(3) / 4, atol=0.06)  # diamond bond ≈ 2.35 Å, rattled by 0.01 Å
    cu = structures.cu500()
    assert len(cu) == 500 and cu.cell.lengths() == pytest.approx([18.05] * 3)
    forces = cu.get_forces()
    assert np.abs(forces.sum(axis=0)).max() < 1e-8 and np.abs(forces).max() > 1e-4  # EMT labels, rattled


def test_shared_data_frames_are_converted_to_ev():
    raw = np.load(structures.shared_data_dir() / "md17" / "md17_ethanol_first2000.npz")
    eth = structures.ethanol()
    assert eth.get_chemical_formula() == "C2H6O" and not eth.pbc.any()
    assert eth.get_potential_energy() == pytest.approx(float(raw["E"][0, 0]) * units.kcal / units.mol)
    assert eth.get_potential_energy() / float(raw["E"][0, 0]) == pytest.approx(0.0433641, rel=1e-5)
    slab = structures.oc20_slab()
    assert len(slab) == 17 and sum(len(c.get_indices()) for c in slab.constraints) == 10


def test_missing_shared_data_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("POTENTIALS_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="POTENTIALS_SHARED_DATA"):
        structures.ethanol()


def test_md17_splits_are_disjoint(tmp_path):
    paths = structures.write_md17_splits(tmp_path, n_train=20, n_val=5, n_test=10)
    import ase.io

    frames = {k: ase.io.read(p, ":") for k, p in paths.items()}
    assert [len(frames[k]) for k in ("train", "val", "test")] == [20, 5, 10]
    keys = {k: {a.positions.tobytes() for a in f} for k, f in frames.items()}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["val"])
    assert frames["test"][0].get_forces().shape == (9, 3)


def test_train_for_budget_stops_and_records_a_curve():
    fractions = []
    evals = iter(range(100))
    out = _common.train_for_budget(lambda: range(3), lambda batch, f: fractions.append(f),
                                   lambda: {"m": next(evals)}, 0.002, n_points=3)
    assert out["steps"] == len(fractions) and out["train_s"] >= 0.002
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] < 1.0
    elapsed = [c["elapsed_s"] for c in out["curve"]]
    assert elapsed == sorted(elapsed) and out["curve"][-1]["steps"] == out["steps"]
    with pytest.raises(ValueError, match="no batch"):
        _common.train_for_budget(lambda: [], lambda batch, f: None, dict, 0.01)


def test_stage_two_raises_energy_weight_and_lowers_lr():
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    assert _common.loss_weights(0.5, opt) == (1.0, 100.0) and opt.param_groups[0]["lr"] == 0.01
    assert _common.loss_weights(0.8, opt) == (1000.0, 100.0) and opt.param_groups[0]["lr"] == 1e-3
    assert _common.loss_weights(0.8, None, stage_two=False) == (1.0, 100.0)
    assert _common.loss_weights(0.9, opt, stage_two_lr=4e-4) == (1000.0, 100.0)
    assert opt.param_groups[0]["lr"] == 4e-4


def test_neighbor_builders_agree_on_small_cells():
    cells = neighbors_bench.cu_cells(4000)
    assert len(cells[0]) == 2 and len(cells[-1]) == 4000
    rows = neighbors_bench.run(max_atoms=32, min_time=0.0)
    assert [r["n_atoms"] for r in rows] == [2, 4, 32]
    assert rows[0]["n_edges"] == 2 * 42  # 42 neighbours within 5 Å in fcc Cu (12 + 6 + 24)


def test_quick_settings_and_model_selection():
    s = suite.Settings.make(True, threads=1)
    assert s.dtypes == ("float32",) and s.threads == 1 and s.budget_s == 60.0
    assert set(suite.selected_models(s)) == set(suite.QUICK_MODELS)
    s = suite.Settings.make(False, frameworks=("mace",))
    assert {fw for fw, _ in suite.selected_models(s).values()} == {"mace"}
    with pytest.raises(ValueError, match="unknown model"):
        suite.selected_models(suite.Settings.make(False, models=("nope",)))


def test_read_frames_fills_missing_labels_and_checks_batch_size(tmp_path):
    path = structures.write_structure("si64", tmp_path)
    frames, batch_size = _common.read_frames({"path": str(path), "batch_size": 1})
    assert batch_size == 1 and frames[0].get_forces().shape == (64, 3) and not frames[0].get_forces().any()
    with pytest.raises(ValueError, match="fewer than batch_size 2"):
        _common.read_frames({"path": str(path), "batch_size": 2})


def test_worker_env_gives_every_framework_the_same_allocator_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "7")  # stray settings of the caller's shell must not leak through
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    tuned = peers.worker_env(2, malloc="tuned")
    assert tuned["MALLOC_MMAP_MAX_"] == "0" and "POTENTIALS_MALLOC" not in tuned
    assert int(tuned["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30
    assert "MALLOC_ARENA_MAX" not in tuned and "GLIBC_TUNABLES" not in tuned
    system = peers.worker_env(2, malloc="system")
    assert system["POTENTIALS_MALLOC"] == "system" and not any(k.startswith("MALLOC_") for k in system)
    assert "GLIBC_TUNABLES" not in system
    with pytest.raises(ValueError, match="malloc"):
        peers.worker_env(2, malloc="jemalloc")


def _curve_record(kind: str, frames: int, target_f: float, target_e: float, old_f: float | None = None,
                  experiment: str = "rmd17") -> dict:
    test = {"paracetamol" if experiment == "rmd17" else "CuNi": {"force_mae": target_f, "energy_mae": target_e}}
    if old_f is not None:
        test["ethanol" if experiment == "rmd17" else "CuAgAu"] = {"force_mae": old_f, "energy_mae": 1.0}
    return {"family": "egnn", "experiment": experiment, "kind": kind, "frames": frames, "steps": 600,
            "wall_s": 10.0, "test": test}


def test_finetune_report_tabulates_curves_and_names_where_fine_tuning_loses(tmp_path):
    from benchmarks import finetune_curves

    records = [_curve_record("base", 400, 90.0, 5.0, old_f=20.0),
               _curve_record("scratch", 25, 80.0, 4.0), _curve_record("finetune", 25, 40.0, 2.0, old_f=30.0),
               _curve_record("finetune+replay", 25, 45.0, 2.5, old_f=22.0),
               _curve_record("scratch", 200, 30.0, 1.0), _curve_record("finetune", 200, 33.0, 0.9, old_f=35.0),
               _curve_record("scratch", 25, 50.0, 5.0, experiment="emt"),
               _curve_record("scratch", 25, 50.0, 3.0, experiment="emt"),
               _curve_record("finetune", 25, 20.0, 2.0, old_f=9.0, experiment="emt"),
               _curve_record("finetune", 25, 24.0, 6.0, old_f=9.0, experiment="emt")]
    # EMT: seed means against seed means (energy 4.0 against 4.0 is not ahead)
    assert finetune_curves.not_better(records, "paracetamol") == [
        "egnn rmd17 200 frames, force_mae: finetune 33.00 meV/Å against scratch 30.00 (+10 %)",
        "egnn emt 25 frames, energy_mae (mean of 2 seeds): finetune 4.00 meV/atom against scratch 4.00 (+0 %)"]
    args = finetune_curves.parser().parse_args(["--pretrain", "ethanol"])
    meta = {"start": "2026-01-02T03:04:05", "machine_start": report.machine_info(), "command": "x",
            "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out", "reuse")}}
    md = finetune_curves.write({"meta": meta, "records": records}, tmp_path).read_text()
    assert "| egnn | 25 | 600 | 80 | 40 | 45 | 4 | 2 | 2.5 | 2 |" in md  # scratch / fine-tuned force MAE: 2
    assert "+10 %" in md and (tmp_path / "finetune.png").stat().st_size > 0
    assert "| egnn | finetune | 25 | 30.0 / 1.0 | 40.0 / 2.0 |" in md  # forgetting: ethanol, then the target
    # the periodic set and its base's set: mean ± standard deviation over the seeds
    assert "| egnn | finetune | 25 | 600 | 2 | 22 ± 2.8 | 4 ± 2.8 | 9 ± 0 | 1 ± 0 |" in md

    # --merge: another family's rerun keeps this report's records and replaces only its own pairs
    rerun = [{**r, "family": "facet"} for r in records if r["experiment"] == "emt"]
    merged, kept = finetune_curves.merge_records(records, rerun + [records[-1]])
    assert kept == ["egnn rmd17"] and len(merged) == 6 + len(rerun) + 1
