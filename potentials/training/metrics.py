"""Error metrics and loss terms accumulated over an epoch, summed across processes under DDP.

The metrics are those of :mod:`potentials.metrics` (the definitions ``potentials evaluate`` reports too), in the
same units: energy MAE meV/atom, force MAE/RMSE meV/Å, force cosine (dimensionless), stress MAE GPa, OC20's energy
MAE per structure (meV), EwT and EFwT; loss terms in the loss's own units. Every value is a ratio of two sums over
the whole epoch (never a mean of batch means), so it does not depend on how the data were batched or split across
processes: a run on two processes logs the same validation metrics as a run on one.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from potentials import keys
from potentials import metrics as definitions
from potentials.training.loss import TERMS

#: The metrics logged in training (keys ``<split>/<name>``).
METRICS = ("energy_mae", "force_mae", "force_rmse", "force_cos", "stress_mae", "energy_total_mae", "ewt", "efwt")
UNITS = {name: definitions.UNITS[name] for name in METRICS}
#: Accumulated quantities: each a (sum, count) pair.
_SLOTS = (*definitions.ERROR_TERMS, *(f"loss_{t}" for t in TERMS))


class PotentialMetrics(Metric):
    """Accumulates E/F/S errors (and the loss terms) batch by batch; ``compute()`` gives the epoch values.

    State: ``sums`` and ``counts`` [K] float64, one entry per quantity, reduced by summation across processes.

    Args:
        free_atoms_only: leave fixed atoms (``batch.fixed``) out of the force metrics. EFwT never looks at fixed
            atoms (OC20's definition); without fixed atoms that is every atom.
        loss_weights: weight of each loss term (``energy``, ``forces``, ``stress``) for the epoch's ``loss``.
    """

    full_state_update = False

    def __init__(self, free_atoms_only: bool = False, loss_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.free_atoms_only = free_atoms_only
        self.loss_weights = dict(loss_weights or {})
        zeros = torch.zeros(len(_SLOTS), dtype=torch.float64)
        self.add_state("sums", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("counts", default=zeros.clone(), dist_reduce_fx="sum")

    def _add(self, terms: dict[str, torch.Tensor]) -> None:
        for slot, values in terms.items():
            i = _SLOTS.index(slot)
            self.sums[i] += values.detach().sum()
            self.counts[i] += values.numel()

    @torch.no_grad()
    def update(self, out: dict[str, torch.Tensor], batch,
               loss_terms: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Add one batch: model output ``out``, labelled ``batch``, and the loss's (sum, count) per term."""
        has_energy = batch.has_energy
        if bool(has_energy.any()):
            self._add(definitions.energy_terms(out[keys.ENERGY], batch.energy, batch.num_atoms, has_energy))
            both = has_energy & batch.has_forces
            if keys.FORCES in out and bool(both.any()):
                self._add(definitions.efwt_terms(out[keys.ENERGY], batch.energy, out[keys.FORCES], batch.forces,
                                                 batch.batch, ~batch.fixed, both))
        if keys.FORCES in out:
            mask = batch.has_forces[batch.batch]
            if self.free_atoms_only:
                mask = mask & ~batch.fixed
            if bool(mask.any()):
                self._add(definitions.force_terms(out[keys.FORCES][mask], batch.forces[mask]))
        if keys.STRESS in out:
            terms = definitions.stress_terms(out[keys.STRESS], batch.stress, batch.has_stress)
            if terms["stress_ae"].numel():
                self._add(terms)
        for term, (total, count) in (loss_terms or {}).items():
            i = _SLOTS.index(f"loss_{term}")
            self.sums[i] += total.detach().double()
            self.counts[i] += count.detach().double()

    def compute(self) -> dict[str, float]:
        """Epoch values; a quantity with no data is left out (``loss`` needs every weighted term present)."""
        sums = dict(zip(_SLOTS, self.sums.tolist(), strict=True))
        counts = dict(zip(_SLOTS, self.counts.tolist(), strict=True))
        values = definitions.metric_values(sums, counts, METRICS)
        terms = {t: sums[f"loss_{t}"] / counts[f"loss_{t}"] for t in TERMS if counts[f"loss_{t}"] > 0}
        for term, value in terms.items():
            values[f"loss_{term}"] = value
        if terms:
            values["loss"] = sum(self.loss_weights.get(t, 1.0) * v for t, v in terms.items())
        return values
