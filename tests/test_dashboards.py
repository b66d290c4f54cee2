"""Dashboards: a tiny run's metrics and figures read back from TensorBoard's HTTP API and from an offline wandb run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from hydra import compose, initialize_config_dir

from potentials.conf import CONFIG_DIR
from potentials.training.run import register_resolvers, run
from tests.test_training import SMALL_DATA
from tests.tiny_model import single_thread

FIGURES = ("energy_parity", "force_parity", "force_error_hist", "force_error_per_element")


def _train(run_dir: Path, logger: str, *overrides: str) -> dict:
    """Two epochs of a tiny EGNN on 24 EMT structures, logging to ``logger``; figures of the test split at the end."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"run_dir={run_dir}", f"data_root={run_dir / 'data'}", f"logger={logger}", "trainer.max_epochs=2",
            "trainer.max_time=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "model.channels=8", "model.num_layers=1", "export=false", "demo_relax=false", *SMALL_DATA, *overrides])
    with single_thread():
        return run(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_logged_scalars_and_figures(tmp_path):
    summary = _train(tmp_path, "tensorboard")
    for name in FIGURES:  # the files of the test-split figures
        assert Path(summary["figures"][name]).stat().st_size > 5000, name
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        tags, deadline = {}, time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()
            try:
                tags = _get(f"{base}/scalars/tags")
            except OSError:  # not listening yet
                pass
            if any("val/force_mae" in t for t in tags.values()):
                break
            time.sleep(0.5)
        run_name = next(r for r, t in tags.items() if "val/force_mae" in t)
        assert {"train/loss", "val/energy_mae", "test/force_mae"} <= set(tags[run_name])
        query = urllib.parse.urlencode({"run": run_name, "tag": "val/force_mae"})
        points = _get(f"{base}/scalars/scalars?{query}")  # [[wall time, step, value], ...], one per epoch
        assert len(points) == 2 and all(p[2] > 0 for p in points)
        images = _get(f"{base}/images/tags")
        assert {f"test/{name}" for name in FIGURES} <= set(images[run_name])
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_offline_wandb_run_holds_the_metrics_and_figures(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        _train(tmp_path, "wandb")  # the default name: none under the compose API (Hydra's choices need a Hydra run)
    finally:
        wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # `wandb leet inspect --json` prints the records of the run's .wandb log, one JSON object per line
    cli = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(cli), "leet", "inspect", "--json", str(runs[0])], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    val = [h["val/force_mae"] for h in history if "val/force_mae" in h]
    assert len(val) == 2 and all(v > 0 for v in val)
    assert any("test/force_mae" in h for h in history)
    logged = {key.split(".")[0] for h in history for key in h if key.endswith("_type") and "image" in str(h[key])}
    assert logged == {f"test/{name}" for name in FIGURES}  # the figures are logged as images
    assert any(r.get("type") == "config" for r in records)
    images = sorted(p.name for p in runs[0].glob("files/media/images/test/*.png"))
    assert [name for name in FIGURES if not any(i.startswith(f"{name}_") for i in images)] == [], images
    assert len(images) == len(FIGURES), images


def test_wandb_run_name_follows_hydra_choices_and_is_optional_without_hydra(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        plain = compose("train", overrides=["logger=wandb", "model=facet", f"run_dir={tmp_path}"])
        assert plain.logger.name is None  # compose API: no Hydra run, W&B picks the name
        full = compose("train", overrides=["logger=wandb", "model=facet", f"run_dir={tmp_path}"],
                       return_hydra_config=True)
    HydraConfig.instance().set_config(full)
    try:
        assert full.logger.name == f"facet-{full.hydra.runtime.choices.data}"
    finally:
        HydraConfig.instance().cfg = None
