"""Loss over the labels that exist: w_E·(per-atom energy) + w_F·forces + w_S·stress, MSE or Huber.

Each term is a mean of elementwise losses over the labelled entries of the batch: energies per atom over
structures with an energy, force components over atoms with forces, stress components over periodic structures
with a stress. :meth:`PotentialLoss.terms` returns the sums and counts behind those means, so that a term can be
normalised by the count over a *global* batch split across processes (see :meth:`PotentialLoss.combine`):
then per-process losses averaged by DDP's gradient all-reduce give exactly the gradient of the global mean.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from potentials import keys

#: ``energy_nll``, ``forces_nll``: the Gaussian NLLs of a shallow ensemble's heads
#: (potentials.training.ensemble.EnsembleLoss)
TERMS = (keys.ENERGY, keys.FORCES, keys.STRESS, "energy_nll", "forces_nll")


def _masked_sum(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str, delta: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the elementwise loss over the rows selected by ``mask``, number of elements summed)."""
    if kind not in ("mse", "huber"):
        raise ValueError(f"loss kind must be 'mse' or 'huber', got {kind!r}")
    p, t = pred[mask], target[mask]
    count = torch.tensor(float(p.numel()), dtype=pred.dtype, device=pred.device)
    if not p.numel():
        return pred.sum() * 0.0, count  # keeps the graph: every process must reach every parameter
    if kind == "mse":
        return F.mse_loss(p, t, reduction="sum"), count
    return F.huber_loss(p, t, delta=delta, reduction="sum"), count


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

    def terms(self, out: dict[str, torch.Tensor], batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per weighted term: (sum of elementwise losses, number of elements) over the labelled entries.

        Energies enter per atom, (E_pred − E)/N; forces per Cartesian component; stress per tensor component.
        Every term with a positive weight is present, whatever the batch holds (processes exchange the counts,
        so all must have the same terms): one with no labelled entry, or missing from ``out``, has sum 0 (still
        attached to the graph) and count 0.
        """
        energy = out[keys.ENERGY]
        n = batch.num_atoms.to(energy.dtype)
        none = (energy.sum() * 0.0, torch.zeros((), dtype=energy.dtype, device=energy.device))
        parts = {}
        if self.weights[keys.ENERGY] > 0:
            parts[keys.ENERGY] = _masked_sum(energy / n, batch.energy / n, batch.has_energy, self.kind, self.delta)
        if self.weights[keys.FORCES] > 0:
            parts[keys.FORCES] = none
            if keys.FORCES in out:
                atom_mask = batch.has_forces[batch.batch]
                if self.free_atoms_only:
                    atom_mask = atom_mask & ~batch.fixed
                parts[keys.FORCES] = _masked_sum(out[keys.FORCES], batch.forces, atom_mask, self.kind, self.delta)
        if self.needs_stress:
            parts[keys.STRESS] = none
            if keys.STRESS in out:
                mask = batch.has_stress & torch.isfinite(out[keys.STRESS]).flatten(1).all(1)
                parts[keys.STRESS] = _masked_sum(out[keys.STRESS], batch.stress, mask, self.kind, self.delta)
        return parts

    def combine(self, terms: dict[str, tuple[torch.Tensor, torch.Tensor]],
                counts: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weighted total and the per-term means from :meth:`terms`.

        Args:
            terms: output of :meth:`terms`.
            counts: denominator of each term; default the term's own count (the mean over this batch). Under DDP
                pass (count over all processes) / (number of processes): the gradients DDP averages then equal
                the gradient of the mean over the global batch.

        Returns:
            ``{"total": Σ w·term, <term>: sum / count, ...}``; a term with count 0 contributes 0.
        """
        parts = {}
        for name, (total, count) in terms.items():
            denominator = count if counts is None else counts[name]
            parts[name] = total / denominator.clamp(min=1e-12) if bool(denominator > 0) else total * 0.0
        total = sum((self.weights[k] * v for k, v in parts.items()), start=next(iter(terms.values()))[0] * 0.0)
        return {"total": total, **parts}

    def __call__(self, out: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        """Returns the components (means over this batch) and their weighted ``total``."""
        terms = self.terms(out, batch)
        if not terms:
            raise ValueError("the loss has no term: every weight is zero, or the output lacks forces")
        return self.combine(terms)
