"""Shared test fixtures and session settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Environment variable that points the tests at the folder of real data samples.
SHARED_DATA_ENV = "POTENTIALS_SHARED_DATA"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real data samples: ``<project root>/../shared/data`` or ``$POTENTIALS_SHARED_DATA``.

    Tests that need real data fail (never skip) when it is missing.
    """
    override = os.environ.get(SHARED_DATA_ENV)
    path = Path(override) if override else PROJECT_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        how = f"{SHARED_DATA_ENV} is set to {override!r}" if override else f"{SHARED_DATA_ENV} is not set"
        pytest.fail(
            f"shared data folder not found at {path} ({how}). Put the real data samples there or set "
            f"{SHARED_DATA_ENV}=/path/to/shared/data",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def cu_model(tmp_path_factory) -> Path:
    """A tiny EGNN fitted to EMT Cu in a few seconds, exported as training does (see tests/tiny_model.py)."""
    from tests.tiny_model import cu_model

    return cu_model(tmp_path_factory.mktemp("cu_model"))


@pytest.fixture
def one_torch_thread():
    """Run torch on one thread during the test (tiny models; two test workers share two cores)."""
    from tests.tiny_model import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A ``data_root`` shared by the tests that train in this session (the EMT set is generated once per size)."""
    return tmp_path_factory.mktemp("data_root")
