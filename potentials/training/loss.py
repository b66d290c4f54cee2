"""Loss over the labels that exist: w_E·(per-atom energy) + w_F·forces + w_S·stress, MSE or Huber."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from potentials import keys


def _masked(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str, delta: float
            ) -> torch.Tensor:
    """Mean of the elementwise loss over the rows selected by ``mask`` (0 when none)."""
    if not bool(mask.any()):
        return pred.sum() * 0.0
    p, t = pred[mask], target[mask]
    if kind == "mse":
        return F.mse_loss(p, t)
    if kind == "huber":
        return F.huber_loss(p, t, delta=delta)
    raise ValueError(f"loss kind must be 'mse' or 'huber', got {kind!r}")


class PotentialLoss:
    """Weighted sum of energy-per-atom, force and stress losses.

    Args:
        energy_weight, forces_weight, stress_weight: weights w_E, w_F, w_S.
        kind: ``"mse"`` or ``"huber"``.
        huber_delta: Huber transition point (in the label's units: eV/atom, eV/Å, eV/Å³).
        free_atoms_only: forces of fixed atoms (``batch.fixed``) are left out of the force loss.
    """

    def __init__(self, energy_weight: float = 1.0, forces_weight: float = 10.0, stress_weight: float = 0.0,
                 kind: str = "mse", huber_delta: float = 0.01, free_atoms_only: bool = False) -> None:
        self.weights = {keys.ENERGY: energy_weight, keys.FORCES: forces_weight, keys.STRESS: stress_weight}
        self.kind = kind
        self.delta = huber_delta
        self.free_atoms_only = free_atoms_only

    @property
    def needs_stress(self) -> bool:
        return self.weights[keys.STRESS] > 0

    def __call__(self, out: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        """Returns the components and ``total``; per-atom energies are (E_pred − E)/N."""
        n = batch.num_atoms.to(out[keys.ENERGY].dtype)
        parts = {}
        if self.weights[keys.ENERGY] > 0:
            parts[keys.ENERGY] = _masked(out[keys.ENERGY] / n, batch.energy / n, batch.has_energy, self.kind,
                                         self.delta)
        if self.weights[keys.FORCES] > 0 and keys.FORCES in out:
            atom_mask = batch.has_forces[batch.batch]
            if self.free_atoms_only:
                atom_mask = atom_mask & ~batch.fixed
            parts[keys.FORCES] = _masked(out[keys.FORCES], batch.forces, atom_mask, self.kind, self.delta)
        if self.needs_stress and keys.STRESS in out:
            mask = batch.has_stress & torch.isfinite(out[keys.STRESS]).flatten(1).all(1)
            parts[keys.STRESS] = _masked(out[keys.STRESS], batch.stress, mask, self.kind, self.delta)
        total = sum(self.weights[k] * v for k, v in parts.items())
        return {"total": total, **parts}
