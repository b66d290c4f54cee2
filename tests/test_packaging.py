"""The installed package trains on its own: the config tree is package data, and `potentials train` composes it
from any working directory (no source checkout needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from potentials.conf import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def _shipped_data_files(monkeypatch) -> dict[str, set[str]]:
    """{package: data files (paths relative to the package folder)} that setuptools' build_py puts in a wheel."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    dist.include_package_data = False  # package-data only: no egg-info/manifest written into the source tree
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    return {package: set(files) for package, _, _, files in build_py.data_files}


@pytest.mark.filterwarnings("ignore:`project.license` as a TOML table is deprecated")
def test_every_config_yaml_is_package_data(monkeypatch):
    shipped = _shipped_data_files(monkeypatch)
    yamls = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")}
    assert {"train.yaml", "data/emt.yaml", "model/egnn.yaml", "trainer/default.yaml", "logger/csv.yaml"} <= yamls
    assert yamls <= shipped["potentials.conf"], sorted(yamls - shipped["potentials.conf"])
    assert "grid_kernels.cpp" in shipped["potentials.accel"]
    assert CONFIG_DIR == ROOT / "potentials" / "conf" and not (ROOT / "conf").exists()


def test_potentials_train_composes_the_package_configs_in_any_folder(tmp_path):
    """`potentials train --cfg job` and `--help` from a folder without configs; nothing is written there."""
    cmd = [sys.executable, "-m", "potentials.cli.main", "train"]
    job = subprocess.run([*cmd, "--cfg", "job", "model=facet", "data=md17", "data.path=x.npz", "seed=3"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "_target_: potentials.models.facet.Facet" in job.stdout
    assert "_target_: potentials.datasets.md17.read" in job.stdout
    assert "\nseed: 3\n" in job.stdout
    usage = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert usage.returncode == 0, usage.stderr[-2000:]
    assert "potentials train is powered by Hydra" in usage.stdout
    for group in ("data", "model", "training", "trainer", "logger", "experiment"):
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in usage.stdout
    assert list(tmp_path.iterdir()) == []
