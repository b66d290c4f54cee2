"""Error metrics and loss terms accumulated over an epoch, summed across processes under DDP.

Reported units: energy MAE meV/atom, force MAE/RMSE meV/Å, force cosine (dimensionless), stress MAE GPa; loss
terms in the loss's own units. OC20's metrics too: energy MAE per structure (meV; IS2RE's energy MAE), EwT (fraction
of structures with |ΔE| < 20 meV) and EFwT (|ΔE| < 20 meV and every force component of every free atom within
30 meV/Å; S2EF's primary metric). Every value is a ratio of two sums over the whole epoch (never a mean of batch
means), so it does not depend on how the data were batched or split across processes: a run on two processes
logs the same validation metrics as a run on one.
"""

from __future__ import annotations

import torch
from ase.units import GPa
from torchmetrics import Metric

from potentials import keys
from potentials.training.loss import TERMS

METRICS = ("energy_mae", "force_mae", "force_rmse", "force_cos", "stress_mae", "energy_total_mae", "ewt", "efwt")
UNITS = {"energy_mae": "meV/atom", "force_mae": "meV/Å", "force_rmse": "meV/Å", "force_cos": "",
         "stress_mae": "GPa", "energy_total_mae": "meV", "ewt": "", "efwt": ""}
#: OC20's thresholds: |ΔE| below EWT_ENERGY (eV) counts for EwT; with every free-atom force component within
#: EFWT_FORCE (eV/Å) also for EFwT.
EWT_ENERGY = 0.02
EFWT_FORCE = 0.03
#: Accumulated quantities: each a (sum, count) pair.
_SLOTS = ("energy_ae", "force_ae", "force_se", "force_cos", "stress_ae", *(f"loss_{t}" for t in TERMS),
          "energy_total_ae", "ewt", "efwt")


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
            self._add_oc20(out, batch)
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

    def _add_oc20(self, out: dict[str, torch.Tensor], batch) -> None:
        """Energy error per structure, EwT and (for structures with energy and forces) EFwT."""
        energy_ae = (out[keys.ENERGY] - batch.energy).abs().double()  # [B] eV, NaN where unlabelled
        energy_ok = energy_ae < EWT_ENERGY
        m = batch.has_energy
        self._add("energy_total_ae", energy_ae[m])
        self._add("ewt", energy_ok[m])
        both = m & batch.has_forces
        if keys.FORCES in out and bool(both.any()):
            free = ~batch.fixed
            worst = (out[keys.FORCES][free] - batch.forces[free]).abs().amax(dim=-1).double()
            max_error = torch.zeros_like(energy_ae).scatter_reduce(0, batch.batch[free], worst, reduce="amax")
            self._add("efwt", (energy_ok & (max_error < EFWT_FORCE))[both])

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
        for name, slot, factor in (("energy_total_mae", "energy_total_ae", 1e3), ("ewt", "ewt", 1.0),
                                   ("efwt", "efwt", 1.0)):
            if slot in mean:
                values[name] = mean[slot] * factor
        terms = {t: mean[f"loss_{t}"] for t in TERMS if f"loss_{t}" in mean}
        for term, value in terms.items():
            values[f"loss_{term}"] = value
        if terms:
            values["loss"] = sum(self.loss_weights.get(t, 1.0) * v for t, v in terms.items())
        return values
