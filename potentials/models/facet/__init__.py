"""Facet: steerable interatomic potential with spline radial weights and a sphere-grid MLP nonlinearity."""

from __future__ import annotations

from potentials.models.facet.model import Facet

__all__ = ["Facet"]
