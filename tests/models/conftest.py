"""Fixtures shared by the model-component tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_default():
    """e3nn builds its Wigner matrices in the default dtype; float64 keeps the references exact."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

