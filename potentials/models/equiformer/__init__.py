"""EquiformerV2: equivariant Transformer with eSCN SO(2) convolutions (see :mod:`.model`)."""

from __future__ import annotations

from potentials.models.equiformer.model import EquiformerV2

__all__ = ["EquiformerV2"]
