"""MPtrj and OC20 data configs and experiment presets: they compose, and tiny runs train on the real samples."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from potentials.conf import CONFIG_DIR
from potentials.training.run import register_resolvers, run
from tests import oc20_samples as samples

ROOT = Path(__file__).resolve().parents[1]
DATA = ("mptrj", "oc20_s2ef", "oc20_is2re")
FAMILIES = {
    "egnn": ["model.channels=8", "model.num_layers=1"],
    "equiformer_v2": ["model.num_layers=1", "model.lmax=1", "model.mmax=1", "model.channels=8",
                      "model.attn_hidden_channels=8", "model.num_heads=2", "model.attn_alpha_channels=4",
                      "model.attn_value_channels=4", "model.ffn_hidden_channels=8", "model.edge_channels=8",
                      "model.num_basis=8"],
    "facet": ["model.channels=4", "model.lmax=1", "model.num_layers=1", "model.n_knots=6"],
}
TARGETS = {"egnn": "potentials.models.egnn.EGNN", "equiformer_v2": "potentials.models.equiformer.EquiformerV2",
           "facet": "potentials.models.facet.Facet"}
QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.max_time=null", "trainer.max_epochs=2",
         "export=false", "demo_relax=false", "data.source.progress=false", "cutoff=4.0", "data.batch_size=4",
         "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false"]


def _compose(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("data", DATA)
def test_presets_compose_for_every_family(data, tmp_path):
    for family in FAMILIES:
        cfg = _compose(f"+experiment={data}_{family}", "data.path=/data/x", f"run_dir={tmp_path}")
        assert cfg.model._target_ == TARGETS[family] and cfg.data.name == data
        assert cfg.data.source.path == "/data/x"
        assert cfg.training.loss.free_atoms_only == data.startswith("oc20")
        assert cfg.data.split.group_by == ("mp_id" if data == "mptrj" else "sid")
    if data == "oc20_is2re":
        assert cfg.training.loss.forces_weight == 0 and cfg.training.monitor == "val/energy_total_mae"
        assert cfg.data.source.task == "is2re"
    dm = instantiate(cfg.data)
    assert dm.source.func.__module__ == f"potentials.datasets.{data.split('_')[0]}"


def test_train_py_prints_a_composed_preset():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "+experiment=oc20_s2ef_equiformer_v2",
                           "data.path=/data/s2ef", "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "potentials.datasets.oc20.read" in proc.stdout and "free_atoms_only: true" in proc.stdout
    assert "EquiformerV2" in proc.stdout and "group_by: sid" in proc.stdout


def _train(tmp_path: Path, experiment: str, family: str, *overrides: str) -> dict:
    cfg = _compose(f"+experiment={experiment}_{family}", f"run_dir={tmp_path / 'run'}",
                   f"data_root={tmp_path / 'data'}", *QUIET, *FAMILIES[family], *overrides)
    return run(cfg)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_run_on_mptrj_sample(tmp_path, test_data, family):
    """Energies, forces and stress of the 11 real frames; one material validates, the other trains."""
    summary = _train(tmp_path, "mptrj", family, f"data.path={test_data / 'mptrj/mptrj_sample_11_frames.json'}",
                     "data.split.val=1", "data.split.test=0", "test=false", "trainer.max_epochs=1")
    stats = summary["data_stats"]
    assert stats["num_structures"] in (1, 10) and np.isfinite(list(stats["atomic_energies"].values())).all()
    assert Path(summary["best_checkpoint"]).is_file()


def test_tiny_run_on_oc20_s2ef_pairs(tmp_path, test_data):
    frames = samples.load_frames(test_data)
    samples.write_s2ef_pair(tmp_path / "s2ef", 0, frames[::4], fids=range(0, 47, 4))
    summary = _train(tmp_path, "oc20_s2ef", "egnn", f"data.path={tmp_path / 's2ef'}", "data.split.group_by=null",
                     "data.split.val=2", "data.split.test=3")
    test = summary["test"]
    for key in ("test/energy_mae", "test/force_mae", "test/efwt", "test/ewt", "test/energy_total_mae"):
        assert np.isfinite(test[key]), key
    assert 0.0 <= test["test/efwt"] <= test["test/ewt"] <= 1.0


def test_tiny_run_on_oc20_is2re_lmdb(tmp_path, test_data):
    frames = samples.load_frames(test_data)
    values = [pickle.dumps(samples.pyg_record(a, i, is2re_relaxed=frames[-1])) for i, a in enumerate(frames[:40:4])]
    path = samples.write_pyg_lmdb(tmp_path / "is2re.lmdb", values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        summary = _train(tmp_path, "oc20_is2re", "egnn", f"data.path={path}", "data.source.trusted=true",
                         "data.split.group_by=null", "data.split.val=2", "data.split.test=2")
    test = summary["test"]
    assert np.isfinite(test["test/energy_total_mae"]) and 0.0 <= test["test/ewt"] <= 1.0
    assert "test/force_mae" not in test and "test/efwt" not in test
