"""Shared test fixtures and session settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: The real-data samples the tests read (tests/data: each folder has its PROVENANCE.md with source and licence).
TEST_DATA = Path(__file__).resolve().parent / "data"
#: Where the device-aware suites (tests/test_model_contract.py) run their models: ``POTENTIALS_TEST_DEVICE``
#: (cpu when unset; scripts/gpu_check.sh sets cuda).
TEST_DEVICE = torch.device(os.environ.get("POTENTIALS_TEST_DEVICE", "").strip() or "cpu")


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The folder of real DFT data samples shipped with the tests (MD17, rMD17, MPtrj, OC20 excerpts)."""
    return TEST_DATA


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
