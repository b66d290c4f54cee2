"""Error metrics and loss terms accumulated over an epoch, summed across processes under DDP.

Reported units: energy MAE meV/atom, force MAE/RMSE meV/Å, force cosine (dimensionless), stress MAE GPa; loss
terms in the loss's own units. Every value is a ratio of two sums over the whole epoch (never a mean of batch
means), so it does not depend on how the data were batched or split across processes: a run on two processes
logs the same validation metrics as a run on one.
"""

from __future__ import annotations

import torch
from ase.units import GPa
from torchmetrics import Metric

from potentials import keys
from potentials.training.loss import TERMS

METRICS = ("energy_mae", "force_mae", "force_rmse", "force_cos", "stress_mae")
UNITS = {"energy_mae": "meV/atom", "force_mae": "meV/Å", "force_rmse": "meV/Å", "force_cos": "",
         "stress_mae": "GPa"}
#: Accumulated quantities: each a (sum, count) pair.
_SLOTS = ("energy_ae", "force_ae", "force_se", "force_cos", "stress_ae", *(f"loss_{t}" for t in TERMS))


class PotentialMetrics(Metric):
    """Accumulates E/F/S errors (and the loss terms) batch by batch; ``compute()`` gives the epoch values.

    State: ``sums`` and ``counts`` [K] float64, one entry per quantity, reduced by summation across processes.

    Args:
        free_atoms_only: leave fixed atoms (``batch.fixed``) out of the force metrics.
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

    def _add(self, slot: str, values: torch.Tensor) -> None:
        i = _SLOTS.index(slot)
        self.sums[i] += values.detach().double().sum()
        self.counts[i] += values.numel()

    @torch.no_grad()
    def update(self, out: dict[str, torch.Tensor], batch,
               loss_terms: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Add one batch: model output ``out``, labelled ``batch``, and the loss's (sum, count) per term."""
        if bool(batch.has_energy.any()):
            m = batch.has_energy
            self._add("energy_ae", (out[keys.ENERGY][m] - batch.energy[m]).abs() / batch.num_atoms[m])
        if keys.FORCES in out:
            mask = batch.has_forces[batch.batch]
            if self.free_atoms_only:
                mask = mask & ~batch.fixed
            if bool(mask.any()):
                pred, ref = out[keys.FORCES][mask].double(), batch.forces[mask].double()
                diff = pred - ref
                self._add("force_ae", diff.abs())
                self._add("force_se", diff**2)
                self._add("force_cos", torch.nn.functional.cosine_similarity(pred, ref, dim=-1, eps=1e-12))
        if keys.STRESS in out:
            m = batch.has_stress & torch.isfinite(out[keys.STRESS]).flatten(1).all(1)
            if bool(m.any()):
                self._add("stress_ae", (out[keys.STRESS][m] - batch.stress[m]).abs())
        for term, (total, count) in (loss_terms or {}).items():
            i = _SLOTS.index(f"loss_{term}")
            self.sums[i] += total.detach().double()
            self.counts[i] += count.detach().double()

    def compute(self) -> dict[str, float]:
        """Epoch values; a quantity with no data is left out (``loss`` needs every weighted term present)."""
        sums, counts = self.sums.tolist(), self.counts.tolist()
        mean = {slot: s / c for slot, s, c in zip(_SLOTS, sums, counts, strict=True) if c > 0}
        values = {}
        for name, slot, factor in (("energy_mae", "energy_ae", 1e3), ("force_mae", "force_ae", 1e3),
                                   ("force_cos", "force_cos", 1.0), ("stress_mae", "stress_ae", 1 / GPa)):
            if slot in mean:
                values[name] = mean[slot] * factor
        if "force_se" in mean:
            values["force_rmse"] = mean["force_se"] ** 0.5 * 1e3
        terms = {t: mean[f"loss_{t}"] for t in TERMS if f"loss_{t}" in mean}
        for term, value in terms.items():
            values[f"loss_{term}"] = value
        if terms:
            values["loss"] = sum(self.loss_weights.get(t, 1.0) * v for t, v in terms.items())
        return values
