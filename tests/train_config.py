"""The composed `train.py` config for tests that call the training pipeline in-process."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from potentials.conf import CONFIG_DIR
from potentials.training.run import register_resolvers

ROOT = Path(__file__).resolve().parents[1]


def train_config(run_dir: Path, data_root: Path, *overrides: str) -> DictConfig:
    """The package's ``train.yaml`` with ``run_dir``, ``data_root`` and the overrides, as `potentials train` would
    compose it."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"run_dir={run_dir}", f"data_root={data_root}", *overrides])
