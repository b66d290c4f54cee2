"""The energy-model contract: what every model family offers, and all that the rest of the package relies on.

A model is an :class:`EnergyModel`. It maps the geometry of a (batched) graph to per-atom energies; everything
else (reference energies, scale and shift, forces and stress by autograd, units) belongs to
:class:`~potentials.potential.Potential`, which wraps any model the same way.

Input.  ``forward(graph)`` reads, with the names of :mod:`potentials.keys`:

* ``z`` [N] long — atomic numbers;
* ``edge_index`` [2, E] long — (source j, target i), messages flow j → i;
* ``edge_vec`` [E, 3] float, Å — r_ij = pos[j] + offset·cell − pos[i], computed by ``Potential`` from a strained
  geometry;
* ``batch`` [N] long — the structure each atom belongs to (always set by ``Potential``).

A model takes geometry **only** from ``edge_vec``, never from ``pos`` or ``cell``: that is what makes the one
strain derivative in ``Potential`` the stress of every family.  A model's energy is smooth at ``cutoff``: every
edge enters through functions of |r_ij| that vanish there with their derivatives.

Output.  Per-atom energies [N] in model units (``Potential`` multiplies them by its ``scale`` and adds ``shift``
and the reference energies), or, for a model with a direct-force head (``direct_forces`` true), a dict with
``node_energy`` [N] and ``forces`` [N, 3] in model units per Å: those forces are read from the head and are not
−∂E/∂r (non-conservative).

Export.  A model is rebuilt from its Hydra config (``_target_`` names the class).  :meth:`resolved_config` adds
what the model resolved from defaults that may change between versions, so a file keeps the model it was trained
with; :meth:`upgrade_config` turns the config of a file written by an older version into the one the current
class needs to rebuild that same model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EnergyModel(nn.Module):
    """Base class of every energy model (see the module docstring for the contract).

    Args:
        cutoff: neighbour radius, Å; the model's radial functions end there, so it is fixed by training.

    Attributes:
        cutoff: the neighbour radius, Å.
        direct_forces: whether ``forward`` returns a dict with direct (non-conservative) ``forces``; ``Potential``
            then takes those forces instead of −∂E/∂r, and keeps the parameter gradients of the forward pass.
    """

    direct_forces: bool = False

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        if not float(cutoff) > 0:
            raise ValueError(f"cutoff must be positive (Å), got {cutoff}")
        self.cutoff = float(cutoff)

    def forward(self, graph) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-atom energies [N] (model units), or ``{"node_energy": [N], "forces": [N, 3]}`` when
        ``direct_forces``; reads ``z``, ``edge_index``, ``edge_vec`` (Å) and ``batch`` of ``graph``."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward(graph)")

    def resolved_config(self) -> dict[str, Any]:
        """Constructor arguments as this instance resolved them from defaults, written over the Hydra config in a
        model file, so that a later version with other defaults rebuilds the same model.  Empty when every
        default is fixed for good."""
        return {}

    @classmethod
    def upgrade_config(cls, config: dict[str, Any], format_version: int) -> dict[str, Any]:
        """The model config of a file written in ``format_version``, with the defaults of the version that wrote
        it made explicit; ``config`` is left unchanged.  The base class has nothing to upgrade."""
        return dict(config)
