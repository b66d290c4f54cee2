"""Error metrics of predicted energies, forces and stress: the one definition used in training and evaluation.

Each metric is the mean of per-item terms (or the square root of such a mean), so it is a ratio of two sums: the
training metrics add the sums batch by batch and across processes (:mod:`potentials.training.metrics`),
``potentials evaluate`` takes them over all predictions at once (:mod:`potentials.evaluate`), and both report the
same number for the same predictions.

Items and reporting units (:data:`UNITS`):

- ``energy_mae``, ``energy_rmse``: per structure with an energy label, |ΔE| / atoms, meV/atom;
- ``force_mae``, ``force_rmse``: per Cartesian force component of the counted atoms, meV/Å;
- ``force_cos``: per counted atom, the cosine between predicted and reference force (dimensionless);
- ``stress_mae``, ``stress_rmse``: per component of the 9 of each structure with a stress label (and a finite
  prediction), GPa;
- OC20's: ``energy_total_mae`` per structure, meV (IS2RE's energy MAE); ``ewt``, the fraction of structures with
  |ΔE| < :data:`EWT_ENERGY`; ``efwt``, the fraction of structures with energy and forces that also have every
  force component of every free atom within :data:`EFWT_FORCE` (S2EF's primary metric).
"""

from __future__ import annotations

import torch
from ase.units import GPa

UNITS = {"energy_mae": "meV/atom", "energy_rmse": "meV/atom", "force_mae": "meV/Å", "force_rmse": "meV/Å",
         "force_cos": "", "stress_mae": "GPa", "stress_rmse": "GPa", "energy_total_mae": "meV", "ewt": "", "efwt": ""}
#: OC20's thresholds: |ΔE| below EWT_ENERGY (eV) counts for EwT; with every free-atom force component within
#: EFWT_FORCE (eV/Å) also for EFwT.
EWT_ENERGY = 0.02
EFWT_FORCE = 0.03
#: The per-item terms, in the order in which accumulators keep their sums.
ERROR_TERMS = ("energy_ae", "energy_se", "force_ae", "force_se", "force_cos", "stress_ae", "stress_se",
               "energy_total_ae", "ewt", "efwt")
#: metric → (term, factor to the reporting unit, square root of the mean first)
_DEFINITIONS = {
    "energy_mae": ("energy_ae", 1e3, False), "energy_rmse": ("energy_se", 1e3, True),
    "force_mae": ("force_ae", 1e3, False), "force_rmse": ("force_se", 1e3, True),
    "force_cos": ("force_cos", 1.0, False),
    "stress_mae": ("stress_ae", 1 / GPa, False), "stress_rmse": ("stress_se", 1 / GPa, True),
    "energy_total_mae": ("energy_total_ae", 1e3, False), "ewt": ("ewt", 1.0, False), "efwt": ("efwt", 1.0, False),
}


def energy_terms(pred: torch.Tensor, ref: torch.Tensor, num_atoms: torch.Tensor, labelled: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """Energy terms of the labelled structures: per-atom errors (eV/atom), whole-structure errors (eV) and EwT hits.

    Args:
        pred, ref: [B] energies, eV (``ref`` may be NaN where unlabelled).
        num_atoms: [B] atoms per structure.
        labelled: [B] bool, structures with an energy label.
    """
    error = (pred.double() - ref.double())[labelled]
    per_atom = error / num_atoms[labelled]
    return {"energy_ae": per_atom.abs(), "energy_se": per_atom**2, "energy_total_ae": error.abs(),
            "ewt": (error.abs() < EWT_ENERGY).double()}


def force_terms(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Force terms of the counted atoms: component errors (eV/Å) and per-atom cosines.

    Args:
        pred, ref: [N, 3] forces of the atoms the metrics are taken over, eV/Å.
    """
    pred, ref = pred.double(), ref.double()
    diff = pred - ref
    return {"force_ae": diff.abs(), "force_se": diff**2,
            "force_cos": torch.nn.functional.cosine_similarity(pred, ref, dim=-1, eps=1e-12)}


def stress_terms(pred: torch.Tensor, ref: torch.Tensor, labelled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stress component errors (eV/Å³) of the labelled structures whose prediction is finite.

    Args:
        pred, ref: [B, 3, 3] stress, eV/Å³.
        labelled: [B] bool, structures with a stress label.
    """
    keep = labelled & torch.isfinite(pred).flatten(1).all(1)
    diff = pred[keep].double() - ref[keep].double()
    return {"stress_ae": diff.abs(), "stress_se": diff**2}


def efwt_terms(energy_pred: torch.Tensor, energy_ref: torch.Tensor, forces_pred: torch.Tensor,
               forces_ref: torch.Tensor, structure: torch.Tensor, free: torch.Tensor, labelled: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """EFwT hits (1.0 or 0.0) of the structures with energy and forces.

    Args:
        energy_pred, energy_ref: [B] eV; forces_pred, forces_ref: [N, 3] eV/Å of all atoms.
        structure: [N] structure of each atom; free: [N] bool, atoms not held fixed (the only ones EFwT looks at).
        labelled: [B] bool, structures with both an energy and a force label.
    """
    energy_ok = (energy_pred.double() - energy_ref.double()).abs() < EWT_ENERGY
    worst = (forces_pred[free].double() - forces_ref[free].double()).abs().amax(dim=-1)
    max_error = torch.zeros_like(energy_ok, dtype=torch.float64).scatter_reduce(0, structure[free], worst,
                                                                                reduce="amax")
    return {"efwt": (energy_ok & (max_error < EFWT_FORCE))[labelled].double()}


def metric_values(sums: dict[str, float], counts: dict[str, float], names: tuple[str, ...] | None = None
                  ) -> dict[str, float]:
    """Metrics in reporting units from the sums and counts of their terms; a metric without items is left out.

    Args:
        sums, counts: per term (see :data:`ERROR_TERMS`), the sum of its items and their number.
        names: metrics wanted, in this order (default: every one of :data:`UNITS`).
    """
    values = {}
    for name in names or tuple(UNITS):
        term, factor, root = _DEFINITIONS[name]
        if counts.get(term, 0) > 0:
            mean = sums[term] / counts[term]
            values[name] = (mean**0.5 if root else mean) * factor
    return values


def metrics_of(terms: dict[str, torch.Tensor], names: tuple[str, ...] | None = None) -> dict[str, float]:
    """:func:`metric_values` of one set of per-item terms (as the ``*_terms`` functions return them)."""
    sums = {term: float(items.sum()) for term, items in terms.items()}
    counts = {term: items.numel() for term, items in terms.items()}
    return metric_values(sums, counts, names)
