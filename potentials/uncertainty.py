"""Uncertainty of a potential: committees, shallow ensembles, and how well their spread predicts the error.

Two kinds of ensemble give a spread next to each prediction (docs/uncertainty.md):

* a **committee**: N potentials trained from different seeds (initial weights, batch order) on the same split;
* a **shallow ensemble**: one backbone with N readout heads (:class:`ShallowEnsemble`), trained with Gaussian
  negative log-likelihoods of the heads' energies and forces, so that their spread is meant as a standard deviation;
  every head's forces come from one backbone pass (``Potential.forward(head_forces=True)``).

:class:`EnsemblePotential` evaluates the members (or heads) and returns their mean as ``energy``, ``forces`` and
``stress`` with the spread: ``energy_std`` [B] eV, ``forces_std`` [N] eV/Å (per atom, √(mean over members of
|F_i^m − F̄_i|²)), ``stress_std`` [B, 3, 3] eV/Å³ (per component).  Each spread is multiplied by a scalar fitted on
the validation split at the end of training (:func:`fit_scale`), stored in the model file.

:func:`calibration_report` measures predicted std against actual error (Spearman rank correlation, binned RMS std
against RMSE) for ``potentials evaluate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from potentials import keys
from potentials.errors import PotentialsInputError
from potentials.models.base import EnergyModel
from potentials.potential import Potential

KINDS = ("committee", "shallow")
ENERGY_STD, FORCES_STD, STRESS_STD = "energy_std", "forces_std", "stress_std"
#: the readout attributes whose last ``Linear(·, 1)`` becomes the heads (EGNN, Facet: readout; EquiformerV2)
_READOUTS = ("readout", "energy_head")


class ShallowEnsemble(EnergyModel):
    """An energy model with ``heads`` readout heads on one backbone: the last ``Linear(h, 1)`` of the backbone's
    per-atom readout becomes ``Linear(h, heads)``, each output row initialised independently.

    ``forward`` returns ``{"node_energy": mean over heads [N], "node_energy_heads": [N, heads]}``; with
    ``active_head`` set to k it returns head k's per-atom energies [N] only (as a plain model).
    """

    def __init__(self, backbone: EnergyModel, heads: int) -> None:
        super().__init__(backbone.cutoff)
        if int(heads) < 2:
            raise PotentialsInputError(f"a shallow ensemble needs at least 2 heads, got ensemble.size={heads}")
        if backbone.direct_forces:
            raise PotentialsInputError("a shallow ensemble needs forces derived from the energy; this model has a "
                                       "direct-force head")
        self.backbone = backbone
        self.heads = int(heads)
        self.active_head: int | None = None
        attr = next((n for n in _READOUTS if isinstance(getattr(backbone, n, None), nn.Module)), None)
        readout = getattr(backbone, attr) if attr else None
        last = None if readout is None else [(n, m) for n, m in readout.named_modules() if isinstance(m, nn.Linear)]
        if not last or last[-1][1].out_features != 1:
            raise PotentialsInputError(f"{type(backbone).__name__} has no per-atom readout ending in Linear(·, 1) "
                                       f"(attribute {' or '.join(_READOUTS)}) to put heads on")
        name, linear = last[-1]
        new = nn.Linear(linear.in_features, self.heads, bias=linear.bias is not None).to(linear.weight.dtype)
        if not name:  # the readout is the Linear itself
            setattr(backbone, attr, new)
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(readout.get_submodule(parent_name) if parent_name else readout, child, new)

    def forward(self, graph) -> torch.Tensor | dict[str, torch.Tensor]:
        heads = self.backbone(graph)  # [N, heads]: the readout's squeeze(-1) leaves the head dimension
        if self.active_head is not None:
            return heads[:, self.active_head]
        return {keys.NODE_ENERGY: heads.mean(-1), keys.NODE_ENERGY_HEADS: heads}

    def resolved_config(self) -> dict[str, Any]:
        return self.backbone.resolved_config()


class EnsemblePotential(nn.Module):
    """Mean and spread of a committee of potentials, or of the heads of one shallow-ensemble potential.

    Args:
        members: the committee's potentials (same cutoff and elements); for ``kind="shallow"`` one potential whose
            model is a :class:`ShallowEnsemble`.
        kind: ``"committee"`` or ``"shallow"``.
        calibration: scalars multiplying the spread: ``energy`` (for ``energy_std``) and ``forces`` (for
            ``forces_std`` and ``stress_std``); 1 when missing.

    It offers what code that runs a :class:`Potential` reads (``cutoff``, ``elements``, ``check_elements``,
    ``kernels``, ``compiled``, ``physics``, ``scale``); ``forward`` returns the members' mean under the usual keys plus
    ``energy_std``, ``forces_std``, ``stress_std`` and ``energy_members`` [B, M].
    """

    def __init__(self, members: Sequence[Potential], kind: str = "committee",
                 calibration: dict[str, float] | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise PotentialsInputError(f"ensemble kind must be one of {', '.join(KINDS)}, got {kind!r}")
        members = list(members)
        if kind == "shallow" and (len(members) != 1 or not isinstance(members[0].model, ShallowEnsemble)):
            raise PotentialsInputError("a shallow ensemble is one potential whose model is a ShallowEnsemble")
        if kind == "committee" and len(members) < 2:
            raise PotentialsInputError(f"a committee needs at least 2 members, got {len(members)}")
        cutoffs = {m.cutoff for m in members}
        if len(cutoffs) > 1:
            raise PotentialsInputError(f"committee members have different cutoffs: {sorted(cutoffs)} Å")
        self.members = nn.ModuleList(members)
        self.kind = kind
        self.calibration = {"energy": 1.0, "forces": 1.0, **{k: float(v) for k, v in (calibration or {}).items()}}
        self.metadata: dict[str, Any] = {}

    # what callers of a Potential read: the first member stands for all (same cutoff, elements, labels)
    @property
    def size(self) -> int:
        """Members of the committee, or heads of the shallow ensemble."""
        return self.members[0].model.heads if self.kind == "shallow" else len(self.members)

    @property
    def cutoff(self) -> float:
        return self.members[0].cutoff

    @property
    def scale(self) -> torch.Tensor:
        return self.members[0].scale

    @property
    def model(self) -> EnergyModel:
        return self.members[0].model

    @property
    def elements(self) -> list[int]:
        return self.members[0].elements

    def check_elements(self, z: torch.Tensor) -> None:
        self.members[0].check_elements(z)

    @property
    def kernels(self) -> str:
        return self.members[0].kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        for m in self.members:
            m.kernels = value

    @property
    def compiled(self) -> bool:
        return self.members[0].compiled

    @compiled.setter
    def compiled(self, value: bool) -> None:
        for m in self.members:
            m.compiled = value

    @property
    def physics(self):
        return self.members[0].physics

    @physics.setter
    def physics(self, value) -> None:
        for m in self.members:
            m.physics = value

    def _outputs(self, data, **options) -> Iterator[dict[str, torch.Tensor]]:
        if self.kind == "committee":
            for member in self.members:
                yield member(data, **options)
            return
        # one backbone pass, then every head's forces and stress from it (Potential.forward, head_forces)
        out = self.members[0](data, head_forces=True, **options)
        per_head = {keys.ENERGY: out[keys.ENERGY_HEADS].T, keys.NODE_ENERGY: out[keys.NODE_ENERGY_HEADS].T,
                    keys.FORCES: out.get(keys.FORCES_HEADS), keys.STRESS: out.get(keys.STRESS_HEADS),
                    keys.VIRIAL: out.get(keys.VIRIAL_HEADS)}
        for k in range(self.size):
            yield {key: value[k] for key, value in per_head.items() if value is not None}

    def forward(self, data, compute_forces: bool = True, compute_stress: bool = True,
                create_graph: bool | None = None) -> dict[str, torch.Tensor]:
        """The members' mean and spread (see the class docstring); arguments as :meth:`Potential.forward`."""
        outs = list(self._outputs(data, compute_forces=compute_forces, compute_stress=compute_stress,
                                  create_graph=create_graph))
        result: dict[str, torch.Tensor] = {}
        for key in (keys.ENERGY, keys.NODE_ENERGY, keys.FORCES, keys.STRESS, keys.VIRIAL):
            if key not in outs[0]:
                continue
            stack = torch.stack([o[key] for o in outs])
            mean = stack.mean(0)
            result[key] = mean
            deviation = stack - mean
            if key == keys.ENERGY:
                result["energy_members"] = stack.transpose(0, 1)
                result[ENERGY_STD] = deviation.pow(2).mean(0).sqrt() * self.calibration["energy"]
            elif key == keys.FORCES:
                result[FORCES_STD] = deviation.pow(2).sum(-1).mean(0).sqrt() * self.calibration["forces"]
            elif key == keys.STRESS:
                result[STRESS_STD] = deviation.pow(2).mean(0).sqrt() * self.calibration["forces"]
        return result


def fit_scale(std: np.ndarray, error: np.ndarray) -> float:
    """The scalar s that makes the RMS of s·std equal the RMSE: s² = mean(error²) / mean(std²).

    ``error`` and ``std`` are measured alike: |ΔF_i| (a vector norm) against ``forces_std``, |ΔE| against
    ``energy_std``.  A ratio of means rather than the mean of ratios (the Gaussian maximum-likelihood scale): atoms on
    symmetric sites have std and error both at rounding level, and their ratio would decide the latter.
    """
    std, error = np.asarray(std, dtype=float), np.asarray(error, dtype=float)
    keep = np.isfinite(std) & np.isfinite(error)
    if not keep.any() or not np.any(std[keep] > 0):
        return 1.0
    return float(np.sqrt(np.mean(error[keep] ** 2) / np.mean(std[keep] ** 2)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (NaN with fewer than 3 points or a constant input)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def binned(std: np.ndarray, error: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-count bins by predicted std: each bin's RMS predicted std, RMSE of the actual errors and size.

    A calibrated model has ``std_rms`` ≈ ``rmse`` in every bin.
    """
    std, error = np.asarray(std, dtype=float), np.asarray(error, dtype=float)
    order = np.argsort(std)
    rows = []
    for chunk in np.array_split(order, min(n_bins, len(order))):
        if len(chunk):
            rows.append({"std_rms": float(np.sqrt(np.mean(std[chunk] ** 2))),
                         "rmse": float(np.sqrt(np.mean(error[chunk] ** 2))), "n": int(len(chunk))})
    return rows


def _summary(std: np.ndarray, error: np.ndarray, unit: str) -> dict[str, Any]:
    return {"n": int(len(std)), "unit": unit, "spearman": spearman(std, error),
            "mean_std": float(np.mean(std)), "rmse": float(np.sqrt(np.mean(error ** 2))),
            "rms_std": float(np.sqrt(np.mean(std ** 2))), "binned": binned(std, error)}


def uncertainty_errors(pred) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(predicted std, actual error) pairs of a :class:`~potentials.evaluate.Predictions` with spreads, by level.

    ``forces_per_atom``: ``forces_std`` against |F_pred − F_ref| per atom (eV/Å); ``forces_per_structure``: the RMS
    over a structure's atoms of both; ``energy_per_structure``: ``energy_std`` against |E_pred − E_ref| (eV).
    """
    levels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if pred.forces_std is not None:
        mask = pred.force_mask() & np.isfinite(pred.forces_std)
        err = np.linalg.norm(pred.forces_pred - pred.forces_ref, axis=1)
        if mask.any():
            levels["forces_per_atom"] = (pred.forces_std[mask], err[mask])
            s = pred.structure[mask]
            n = np.bincount(s, minlength=len(pred.num_atoms))
            has = n > 0
            rms = [np.sqrt(np.bincount(s, weights=v[mask] ** 2, minlength=len(n))[has] / n[has])
                   for v in (pred.forces_std, err)]
            levels["forces_per_structure"] = (rms[0], rms[1])
    if pred.energy_std is not None and pred.has_energy.any():
        e = pred.has_energy
        levels["energy_per_structure"] = (pred.energy_std[e], np.abs(pred.energy_pred[e] - pred.energy_ref[e]))
    return levels


def calibration_report(pred, calibration: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``uncertainty`` entry of ``metrics.json``: per level (:func:`uncertainty_errors`) the Spearman rank
    correlation of predicted std and actual error, mean and RMS std, RMSE, and the binned calibration curve; and
    ``calibration_scale``, the scalars the model applied (stored in it at the end of training)."""
    units = {"forces_per_atom": "eV/Å", "forces_per_structure": "eV/Å", "energy_per_structure": "eV"}
    report: dict[str, Any] = {name: _summary(std, err, units[name])
                              for name, (std, err) in uncertainty_errors(pred).items()}
    report["calibration_scale"] = dict(calibration or {})
    return report


def calibration_figure(report: dict[str, Any], title: str = ""):
    """Binned RMS predicted std against RMSE (log-log, the diagonal is perfect calibration), one panel per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [k for k in ("forces_per_atom", "forces_per_structure", "energy_per_structure") if k in report]
    fig, axes = plt.subplots(1, max(len(levels), 1), figsize=(4.2 * max(len(levels), 1), 4), squeeze=False)
    for ax, level in zip(axes[0], levels, strict=False):
        rows = report[level]["binned"]
        x = np.array([r["std_rms"] for r in rows])
        y = np.array([r["rmse"] for r in rows])
        ax.loglog(x, y, "o-", label=f"Spearman {report[level]['spearman']:.2f}")
        positive = np.concatenate([x, y])
        positive = positive[positive > 0]
        if positive.size:
            lo, hi = positive.min() / 1.5, positive.max() * 1.5
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="calibrated")
        unit = report[level]["unit"]
        ax.set_xlabel(f"predicted std ({unit}, RMS per bin)")
        ax.set_ylabel(f"RMSE ({unit})")
        ax.set_title(level.replace("_", " "))
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class UncertaintyExceeded(Exception):
    """Raised by :class:`UncertaintyWatch` to stop a run at a frame above the threshold."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"step {step}: maximum force std {value:.4g} eV/Å is above the threshold")
        self.step, self.value = step, value


class UncertaintyWatch:
    """Follows the maximum per-atom force std of a run (MD or relaxation) step by step.

    Called after each step (``dynamics.attach(watch, interval=1)``), it reads ``forces_std`` from the calculator's
    results, records the maximum, writes a line to ``log`` every ``interval`` steps and at every frame above
    ``threshold`` (flagged ``UNCERTAIN``), stores ``max_force_std`` and ``uncertain`` in ``atoms.info`` (so the
    trajectory frames carry them), and with ``stop`` raises :class:`UncertaintyExceeded` at the first such frame.

    Raises:
        PotentialsInputError: a threshold was given for a model without uncertainty.
    """

    def __init__(self, atoms, calc, *, log=None, interval: int = 10, threshold: float | None = None,
                 stop: bool = False) -> None:
        self.atoms, self.calc, self.interval = atoms, calc, max(int(interval), 1)
        self.threshold, self.stop = threshold, stop
        self.values: list[float] = []
        self.flagged: list[int] = []
        self.enabled = isinstance(getattr(calc, "potential", None), EnsemblePotential)
        if not self.enabled and (threshold is not None or stop):
            raise PotentialsInputError("--max-uncertainty and --stop-on-uncertainty need a model with uncertainty "
                                       "(trained with ensemble.size > 1: a committee or a shallow ensemble)")
        self.file = open(log, "w") if (log is not None and self.enabled) else None  # noqa: SIM115 - closed by close()
        if self.file:
            self.file.write("# step  max_force_std(eV/A)  flag\n")
        self.step = 0

    def __call__(self) -> None:
        if not self.enabled:
            return
        self.atoms.get_forces()  # the results of the current geometry (cached by ASE when present)
        value = float(np.max(self.calc.results["forces_std"])) if len(self.atoms) else 0.0
        self.values.append(value)
        over = self.threshold is not None and value > self.threshold
        self.atoms.info["max_force_std"] = value
        self.atoms.info["uncertain"] = bool(over)
        if over:
            self.flagged.append(self.step)
        if self.file and (over or self.step % self.interval == 0):
            self.file.write(f"{self.step:8d}  {value:.6g}{'  UNCERTAIN' if over else ''}\n")
            self.file.flush()
        step, self.step = self.step, self.step + 1
        if over and self.stop:
            raise UncertaintyExceeded(step, value)

    def close(self) -> None:
        if self.file:
            self.file.close()

    def summary(self) -> dict[str, Any]:
        """Maximum and mean of the recorded maxima, the flagged steps, and the threshold."""
        if not self.values:
            return {}
        return {"max_force_std_eV_per_A": float(np.max(self.values)),
                "mean_max_force_std_eV_per_A": float(np.mean(self.values)), "max_uncertainty": self.threshold,
                "uncertain_steps": self.flagged[:1000], "n_uncertain_steps": len(self.flagged)}
