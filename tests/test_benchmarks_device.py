"""The benchmark harness's ``--device``: it reaches every worker request, workers resolve and record it, a worker
without CUDA refuses ``cuda`` clearly, timings wait for the device, and the peer venvs can take a CUDA torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as bench
from benchmarks import neighbors_bench, peers, structures, suite

sys.path.insert(0, str(Path(peers.WORKER_DIR)))
import _common  # noqa: E402  (worker helpers live beside the workers, outside any package)

TINY_EGNN = {"_target_": "potentials.models.egnn.EGNN", "cutoff": 5.0, "channels": 8, "num_layers": 1}


@pytest.fixture(autouse=True)
def _repo_test_data(monkeypatch):
    """Frames come from the samples in tests/data; workers see no GPU even where the machine has one."""
    monkeypatch.setenv("POTENTIALS_SHARED_DATA", str(Path(__file__).resolve().parent / "data"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_device_setting_reaches_every_worker_request(monkeypatch):
    """Every part's requests, for every framework and task, carry the run's device."""
    requests = []

    def fake_worker(framework, request, **kwargs):
        requests.append((framework, request))
        return {"versions": {}, "device": "cpu", "results": []}

    monkeypatch.setattr(peers, "run_worker", fake_worker)
    models = ("mace-64", "escn-md-64-l2", "nequip-s", "egnn-64")
    settings = suite.Settings.make(True, device="auto", models=models)
    paths = {name: Path(f"/nowhere/{name}.xyz") for name in ("si64", "cu500")}
    splits = {k: Path(f"/nowhere/{k}.xyz") for k in ("train", "val", "test")}
    bench.run_infer(settings, paths)
    bench.run_train(settings, paths, splits)
    bench.run_accuracy(settings, splits)
    bench.run_roofline(settings, paths)
    tasks = {(fw, req["task"]) for fw, req in requests}
    assert tasks == {(fw, task) for fw in ("ours", "mace", "fairchem", "nequip") for task in ("infer", "train_step")} \
        | {("ours", "train_equal_time"), ("mace", "train_equal_time"), ("nequip", "train_equal_time"),
           ("ours", "roofline"), ("ours", "roofs")}
    assert [req.get("device") for _, req in requests] == ["auto"] * len(requests)
    # the default stays the CPU, so reports of CPU machines remain comparable with earlier ones
    assert suite.Settings.make(False).device == "cpu" and suite.Settings.make(True).device == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        suite.Settings.make(False, device="gpu")


def test_device_option_is_in_the_report_settings(monkeypatch, tmp_path):
    rows = [{"n_atoms": 2, "n_edges": 84, "ours_ms": 0.2, "ase_ms": 30.0},
            {"n_atoms": 32, "n_edges": 1344, "ours_ms": 0.9, "ase_ms": 70.0}]
    monkeypatch.setattr(neighbors_bench, "run", lambda: rows)
    bench.main(["run", "--only", "neighbors", "--device", "auto", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "neighbors.json").read_text())["meta"]["settings"]["device"] == "auto"
    assert ", device auto," in (tmp_path / "neighbors.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["run", "--only", "neighbors", "--device", "gpu", "--out", str(tmp_path)])


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _common.resolve_device({"task": "infer"}, "ours") == torch.device("cpu")  # the default
    assert _common.resolve_device({"task": "infer", "device": "auto"}, "ours") == torch.device("cpu")
    with pytest.raises(RuntimeError) as info:
        _common.resolve_device({"task": "infer", "device": "cuda"}, "mace")
    message = str(info.value)
    assert "mace worker" in message and f"torch {torch.__version__}" in message and "\n" not in message
    assert peers.TORCH_INDEX_ENV in message
    with pytest.raises(ValueError, match="must be one of"):
        _common.resolve_device({"task": "infer", "device": "gpu"}, "ours")
    # a GPU seen: auto takes it, except for the tasks that measure the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _common.resolve_device({"task": "infer", "device": "auto"}, "ours") == torch.device("cuda")
    assert _common.resolve_device({"task": "roofs", "device": "auto"}, "ours", cuda_ok=False) == torch.device("cpu")
    with pytest.raises(ValueError, match="measures the CPU only"):
        _common.resolve_device({"task": "roofs", "device": "cuda"}, "ours", cuda_ok=False)
    assert _common.device_name(torch.device("cpu")) == "cpu"


def test_worker_asked_for_cuda_without_it_fails_with_a_clear_first_line(tmp_path):
    """A real worker subprocess (ours) on a torch that sees no GPU: the harness's error names the peer, its torch
    and the way out on its first line, the line the reports show."""
    path = structures.write_structure("si64", tmp_path)
    request = {"task": "infer", "device": "cuda", "threads": 1, "model": TINY_EGNN,
               "structures": [{"name": "si64", "path": str(path)}], "warmup": 0, "steps": 1}
    with pytest.raises(peers.PeerError) as info:
        peers.run_worker("ours", request, timeout=300)
    first = str(info.value).splitlines()[0]
    assert first.startswith("ours worker exited with 1 on task 'infer': RuntimeError: device 'cuda' was asked")
    assert f"torch {torch.__version__}" in first and "--device auto or cpu" in first


def test_worker_results_record_the_device_they_ran_on(tmp_path):
    """``auto`` on a machine without a GPU: the worker runs and records the CPU; so does the equal-time trainer."""
    path = structures.write_structure("si64", tmp_path)
    out = peers.run_worker("ours", {"task": "infer", "device": "auto", "threads": 1, "model": TINY_EGNN,
                                    "structures": [{"name": "si64", "path": str(path)}], "warmup": 0, "steps": 1},
                           timeout=300)
    assert out["device"] == "cpu" and out["results"][0]["n_atoms"] == 64
    splits = structures.write_md17_splits(tmp_path, n_train=10, n_val=5, n_test=5)
    out = peers.run_worker("ours", {"task": "train_equal_time", "device": "cpu", "threads": 1, "model": TINY_EGNN,
                                    "budget_s": 0.3, "batch_size": 5, "eval_points": 2,
                                    **{k: str(v) for k, v in splits.items()}}, timeout=300)
    assert out["device"] == "cpu" and out["steps"] >= 1 and out["test_f_mae_meV_A"] > 0


def test_timers_wait_for_the_device_around_every_timed_step():
    events = []
    times = _common.time_steps(lambda: events.append("step"), 2, 3, sync=lambda: events.append("sync"))
    assert len(times) == 3
    assert events == ["step", "step"] + ["sync", "step", "sync"] * 3  # warm-up steps are not timed
    events.clear()
    out = _common.train_for_budget(lambda: range(2), lambda batch, f: events.append("step"), dict, 0.002,
                                   n_points=2, sync=lambda: events.append("sync"))
    assert events.count("step") == out["steps"] and events.count("sync") == 2 * out["steps"]
    assert all(events[i:i + 3] == ["sync", "step", "sync"] for i in range(0, len(events), 3))


def test_report_header_shows_each_frameworks_device(tmp_path):
    machine = {"host": "h", "cpu": "c", "cores": 2, "memory_GB": 1, "platform": "p", "load_avg_1_5_15": [0, 0, 0]}
    meta = {"start": "2026-01-02T03:04:05", "command": "python -m benchmarks run --device auto",
            "machine_start": machine, "settings": {"threads": 2, "omp_wait_policy": "PASSIVE", "dtypes": ["float32"],
                                                   "budget_s": 60, "device": "auto"}}
    rows = [{"structure": "si64", "batch_size": 1, "atoms_per_batch": 64, "step_ms": 10.0, "structures_per_s": 100.0,
             "atoms_per_s": 6400.0}]
    records = [{"label": "mace-64", "framework": "mace",
                "result": {"versions": {"torch": "2.13.0"}, "device": "cuda:0 (NVIDIA H100 80GB HBM3)",
                           "dtype": "float32", "model": {"n_params": 10}, "results": rows}},
               {"label": "egnn-64", "framework": "ours",
                "result": {"versions": {"torch": "2.13.0"}, "device": "cpu", "dtype": "float32",
                           "model": {"n_params": 10}, "results": rows}},
               {"label": "escn-md-64-l2", "framework": "fairchem", "error": "fairchem worker exited with 1"}]
    (written,) = bench.write({"meta": meta, "records": {"train": records}}, tmp_path)
    text = written.read_text()
    assert "- **devices**:\n  - mace: cuda:0 (NVIDIA H100 80GB HBM3)\n  - ours: cpu\n" in text
    assert "fairchem:" not in text.split("**devices**")[1].split("**settings**")[0]  # nothing measured, no device
    # results written before workers recorded a device ran on the CPU
    del records[0]["result"]["device"]
    assert bench._devices({"train": records}) == {"mace": "cpu", "ours": "cpu"}


def test_resume_keys_ignore_the_cpu_device_but_not_cuda():
    """Cells of reports from before requests named a device (CPU runs) are still taken over by a CPU rerun."""
    old = {"task": "train_equal_time", "budget_s": 600.0, "train": "/a", "model": {"x": 1}}
    assert bench.cell_key("acac", "mace-64", old) == bench.cell_key("acac", "mace-64", {**old, "device": "cpu"})
    assert bench.cell_key("acac", "mace-64", old) != bench.cell_key("acac", "mace-64", {**old, "device": "cuda"})


def test_torch_index_variable_sets_the_torch_install_step(monkeypatch, tmp_path):
    url = "https://download.pytorch.org/whl/cu128"
    spec = peers.PEERS["mace"]
    assert spec.torch_install() == ["torch==2.13.0"]
    assert spec.torch_install(url) == ["torch==2.13.0", "--index-url", url]
    monkeypatch.delenv(peers.TORCH_INDEX_ENV, raising=False)
    assert peers.torch_index() is None
    monkeypatch.setenv(peers.TORCH_INDEX_ENV, url + "/")
    assert peers.torch_index() == url
    monkeypatch.setenv(peers.TORCH_INDEX_ENV, "cu128")
    with pytest.raises(peers.PeerError, match="not a package index URL"):
        peers.torch_index()

    # a build with the variable set: torch alone from that index, the rest pinned to it, the index in the marker
    monkeypatch.setenv(peers.TORCH_INDEX_ENV, url)
    monkeypatch.setattr(peers, "VENV_ROOT", tmp_path)
    commands = []

    def fake_run(cmd, log, env=None):
        commands.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").write_text("")

    monkeypatch.setattr(peers, "_run", fake_run)
    monkeypatch.setattr(peers, "installed_versions", lambda peer: {"torch": "2.13.0+cu128"})
    marker = peers.ensure_venv("mace")
    pip_steps = [c[c.index("install") + 2:] for c in commands if "install" in c]
    assert pip_steps[0] == ["torch==2.13.0", "--index-url", url]
    assert pip_steps[1][:2] == ["-c", str(tmp_path / "mace" / "torch-constraint.txt")]
    assert pip_steps[1][2:] == spec.pins and "--index-url" not in pip_steps[1]
    assert marker["torch_index"] == url and peers.is_ready("mace")
    # another index asked: not ready (rebuilt); the variable unset: the venv is used as it is
    monkeypatch.setenv(peers.TORCH_INDEX_ENV, "https://download.pytorch.org/whl/cu126")
    assert not peers.is_ready("mace")
    monkeypatch.delenv(peers.TORCH_INDEX_ENV)
    assert peers.is_ready("mace")
