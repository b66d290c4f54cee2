"""Error metrics accumulated over an epoch (reduced across processes under DDP via torchmetrics).

Reported units: energy MAE meV/atom, force MAE/RMSE meV/Å, force cosine (dimensionless), stress MAE GPa.
"""

from __future__ import annotations

import torch
from ase.units import GPa
from torch import nn
from torchmetrics import MeanMetric

from potentials import keys

METRICS = ("energy_mae", "force_mae", "force_rmse", "force_cos", "stress_mae")
UNITS = {"energy_mae": "meV/atom", "force_mae": "meV/Å", "force_rmse": "meV/Å", "force_cos": "",
         "stress_mae": "GPa"}


class PotentialMetrics(nn.Module):
    """Accumulates E/F/S errors batch by batch; ``compute()`` gives the epoch values in reporting units."""

    def __init__(self, free_atoms_only: bool = False) -> None:
        super().__init__()
        self.free_atoms_only = free_atoms_only
        self.energy_ae = MeanMetric()
        self.force_ae = MeanMetric()
        self.force_se = MeanMetric()
        self.force_cos = MeanMetric()
        self.stress_ae = MeanMetric()

    @torch.no_grad()
    def update(self, out: dict[str, torch.Tensor], batch) -> None:
        if bool(batch.has_energy.any()):
            m = batch.has_energy
            err = (out[keys.ENERGY][m] - batch.energy[m]).abs() / batch.num_atoms[m]
            self.energy_ae.update(err.double())
        if keys.FORCES in out:
            mask = batch.has_forces[batch.batch]
            if self.free_atoms_only:
                mask = mask & ~batch.fixed
            if bool(mask.any()):
                pred, ref = out[keys.FORCES][mask].double(), batch.forces[mask].double()
                diff = pred - ref
                self.force_ae.update(diff.abs().flatten())
                self.force_se.update((diff**2).flatten())
                cos = torch.nn.functional.cosine_similarity(pred, ref, dim=-1, eps=1e-12)
                self.force_cos.update(cos)
        if keys.STRESS in out:
            m = batch.has_stress & torch.isfinite(out[keys.STRESS]).flatten(1).all(1)
            if bool(m.any()):
                self.stress_ae.update((out[keys.STRESS][m] - batch.stress[m]).abs().flatten().double())

    def compute(self) -> dict[str, float]:
        """Epoch metrics; a metric with no data is left out."""
        values = {}
        for name, metric, factor in (("energy_mae", self.energy_ae, 1e3), ("force_mae", self.force_ae, 1e3),
                                     ("force_cos", self.force_cos, 1.0), ("stress_mae", self.stress_ae, 1 / GPa)):
            if metric.update_called:
                values[name] = float(metric.compute()) * factor
        if self.force_se.update_called:
            values["force_rmse"] = float(self.force_se.compute()) ** 0.5 * 1e3
        return values

    def reset(self) -> None:
        for m in (self.energy_ae, self.force_ae, self.force_se, self.force_cos, self.stress_ae):
            m.reset()
