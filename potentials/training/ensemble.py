"""Training with uncertainty: committees (``ensemble.kind=committee``) and shallow ensembles (``kind=shallow``).

A committee of ``ensemble.size`` members is trained one member after another (or, with ``ensemble.parallel``, as
that many processes at once), each a complete run in ``<run dir>/members/<i>/`` (resumable like any run): member i
uses seed ``seed + i`` for its initial weights and batch order, and the data and split of ``seed``.
``trainer.max_time`` is the wall-clock budget of the whole committee: an equal share per member one after another,
all of it for each when they run at once.  A rerun skips the members that have a ``model.pt`` and resumes those that
were cut off.
The members are then put into one ``model.pt`` with the spread's calibration, fitted on the validation split.

A shallow ensemble is one run: the model's readout gets ``ensemble.size`` heads
(:class:`~potentials.uncertainty.ShallowEnsemble`); the usual loss applies to the heads' mean, and
``ensemble.nll_weight`` weighs a Gaussian negative log-likelihood of the energy per atom under the heads' mean and
variance, ``ensemble.forces_nll_weight`` one of every force component under the mean and variance of the heads'
forces (:class:`EnsembleLoss`); they make the spreads standard deviations.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from potentials import keys
from potentials.errors import PotentialsInputError
from potentials.models.base import EnergyModel
from potentials.potential import Potential
from potentials.training.finetune import committee_size
from potentials.training.loss import PotentialLoss
from potentials.uncertainty import KINDS, EnsemblePotential, ShallowEnsemble, fit_scale, uncertainty_errors

log = logging.getLogger("potentials")
NLL = "energy_nll"
FORCES_NLL = "forces_nll"
#: added to the heads' variance of the energy per atom, (eV/atom)²: keeps the NLL finite when the heads agree
VARIANCE_FLOOR = 1e-8
#: added to the heads' variance of a force component, (eV/Å)²
FORCES_VARIANCE_FLOOR = 1e-6


def options(cfg: DictConfig) -> tuple[str, int]:
    """(kind, size) of ``cfg.ensemble``, checked."""
    e = cfg.get("ensemble") or {}
    kind, size = str(e.get("kind", "committee")), int(e.get("size", 1))
    if kind not in KINDS:
        raise PotentialsInputError(f"ensemble.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if size < 1:
        raise PotentialsInputError(f"ensemble.size must be at least 1, got {size}")
    return kind, size


def is_committee(cfg: DictConfig) -> bool:
    kind, size = options(cfg)
    return kind == "committee" and size > 1


def is_shallow(cfg: DictConfig) -> bool:
    kind, size = options(cfg)
    return kind == "shallow" and size > 1


def wrap_model(model: EnergyModel, cfg: DictConfig) -> EnergyModel:
    """The model with ``ensemble.size`` readout heads for a shallow ensemble; otherwise the model itself."""
    return ShallowEnsemble(model, options(cfg)[1]) if is_shallow(cfg) else model


def wrap_loss(loss: PotentialLoss, cfg: DictConfig) -> PotentialLoss:
    """The loss with the heads' NLL term for a shallow ensemble; otherwise the loss itself."""
    if not is_shallow(cfg):
        return loss
    e = cfg.get("ensemble") or {}
    return EnsembleLoss(loss, float(e.get("nll_weight", 1.0)), float(e.get("forces_nll_weight", 1.0)),
                        float(e.get("nll_beta", 1.0)))


def gaussian_nll(target: torch.Tensor, heads: torch.Tensor, floor: float, beta: float = 0.0) -> torch.Tensor:
    """½·(log σ² + (y − μ)²/σ²) elementwise, μ and σ² the mean and (population) variance of ``heads`` over its
    last dimension plus ``floor``; the constant ½·log 2π left out.

    ``beta`` > 0 multiplies each element by σ^(2β), held constant in the gradient (β-NLL, Seitzer et al., ICLR
    2022): with β = 1 the mean's gradient is that of ½(y − μ)², not (y − μ)/σ², so well-fitted points with a small
    spread no longer dominate the step; the minimum over σ² stays at σ² = (y − μ)².
    """
    mean, var = heads.mean(-1), heads.var(-1, unbiased=False) + floor
    nll = 0.5 * (var.log() + (target - mean) ** 2 / var)
    return nll * var.detach() ** beta if beta else nll


class EnsembleLoss(PotentialLoss):
    """``loss`` on the heads' mean, plus ``nll_weight`` × the mean over structures of ½·(log σ² + (e − μ)²/σ²), with
    e the labelled energy per atom and μ, σ² the mean and variance of the heads' energies per atom, plus
    ``forces_nll_weight`` × the same mean over force components (F_iα against the mean and variance of the heads'
    F_iα^k, the heads' forces: the model is then asked for them, ``needs_head_forces``)."""

    def __init__(self, loss: PotentialLoss, nll_weight: float = 1.0, forces_nll_weight: float = 1.0,
                 nll_beta: float = 0.0) -> None:
        self.__dict__.update(vars(loss))
        self.nll_weight = float(nll_weight)
        self.forces_nll_weight = float(forces_nll_weight)
        self.nll_beta = float(nll_beta)

    @property
    def needs_head_forces(self) -> bool:
        """The force NLL needs every head's forces (``Potential.forward(head_forces=True)``)."""
        return self.forces_nll_weight > 0

    def _nll_weights(self) -> dict[str, float]:
        return {NLL: self.nll_weight, FORCES_NLL: self.forces_nll_weight}

    def terms(self, out: dict[str, torch.Tensor], batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        parts = super().terms(out, batch)
        heads = out.get(keys.ENERGY_HEADS)
        if heads is None:
            return parts
        if self.nll_weight > 0:
            n = batch.num_atoms.to(heads.dtype)
            mask = batch.has_energy
            nll = gaussian_nll(batch.energy[mask].to(heads.dtype) / n[mask], heads[mask] / n[mask].unsqueeze(-1),
                               VARIANCE_FLOOR, self.nll_beta)
            parts[NLL] = (nll.sum(), torch.tensor(float(nll.numel()), dtype=heads.dtype, device=heads.device))
        if self.forces_nll_weight > 0:
            forces = out.get(keys.FORCES_HEADS)  # [K, N, 3]
            if forces is None:
                parts[FORCES_NLL] = (heads.sum() * 0.0, torch.zeros((), dtype=heads.dtype, device=heads.device))
            else:
                atom_mask = batch.has_forces[batch.batch]
                if self.free_atoms_only:
                    atom_mask = atom_mask & ~batch.fixed
                nll = gaussian_nll(batch.forces[atom_mask].to(forces.dtype), forces[:, atom_mask].movedim(0, -1),
                                   FORCES_VARIANCE_FLOOR, self.nll_beta)
                parts[FORCES_NLL] = (nll.sum() if nll.numel() else forces.sum() * 0.0,
                                     torch.tensor(float(nll.numel()), dtype=forces.dtype, device=forces.device))
        return parts

    def combine(self, terms: dict[str, tuple[torch.Tensor, torch.Tensor]],
                counts: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        weights = self._nll_weights()
        rest = {k: v for k, v in terms.items() if k not in weights}
        result = super().combine(rest, None if counts is None else {k: v for k, v in counts.items()
                                                                     if k not in weights})
        for name, weight in weights.items():
            if name not in terms:
                continue
            total, count = terms[name]
            denominator = count if counts is None else counts[name]
            part = total / denominator.clamp(min=1e-12) if bool(denominator > 0) else total * 0.0
            result[name] = part
            result["total"] = result["total"] + weight * part
        return result


def fit_calibration(ensemble: EnsemblePotential, graphs, batch_size: int = 16) -> dict[str, float]:
    """Fit the spread's scalars on ``graphs`` (the validation split) and store them in ``ensemble``; 1 without
    data.  ``forces`` from |ΔF_i| against ``forces_std`` per atom, ``energy`` from |ΔE| against ``energy_std``."""
    from potentials.evaluate import predict_in_eval_mode

    ensemble.calibration = {"energy": 1.0, "forces": 1.0}
    if graphs is None or not len(graphs):
        return dict(ensemble.calibration)
    pred = predict_in_eval_mode(ensemble, graphs, batch_size=batch_size)
    levels = uncertainty_errors(pred)
    fitted = {"energy": fit_scale(*levels["energy_per_structure"]) if "energy_per_structure" in levels else 1.0,
              "forces": fit_scale(*levels["forces_per_atom"]) if "forces_per_atom" in levels else 1.0}
    ensemble.calibration = fitted
    log.info("uncertainty calibration on the validation split (%d structures): energy × %.3g, forces × %.3g",
             len(graphs), fitted["energy"], fitted["forces"])
    return fitted


def uncertainty_summary(ensemble: EnsemblePotential, graphs, out_dir: Path | None, batch_size: int = 16
                        ) -> dict[str, Any]:
    """Test-split metrics (with the calibration report under ``uncertainty``) of a calibrated ensemble; the
    figures go to ``out_dir`` when given."""
    from potentials.evaluate import compute_metrics, predict, write_report

    ensemble.eval()
    pred = predict(ensemble, graphs, batch_size=batch_size)
    if out_dir is not None:
        metrics, _, _ = write_report(pred, out_dir, prefix="test_", title="test split",
                                     calibration=ensemble.calibration)
        return metrics
    return compute_metrics(pred, calibration=ensemble.calibration)


def for_export(potential: Potential, cfg: DictConfig, splits: dict) -> tuple[Potential | EnsemblePotential,
                                                                               dict[str, Any]]:
    """What training exports: a shallow ensemble calibrated on the validation split (and its test-split
    uncertainty report in the returned summary entries), or the potential as it is."""
    if not is_shallow(cfg):
        return potential, {}
    ensemble = EnsemblePotential([potential], kind="shallow")
    info: dict[str, Any] = {"ensemble": {"kind": "shallow", "size": ensemble.size,
                                         "calibration": fit_calibration(ensemble, splits.get("val"))}}
    if len(splits.get("test") or []):
        info["uncertainty"] = uncertainty_summary(ensemble, splits["test"], None).get("uncertainty")
    return ensemble, info


def _max_time_share(value: Any, n: int) -> str | None:
    """``trainer.max_time`` (DD:HH:MM:SS, or a mapping of days/hours/minutes/seconds) divided by ``n``."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [float(p) for p in value.split(":")]
        seconds = sum(p * f for p, f in zip(reversed(parts), (1, 60, 3600, 86400), strict=False))
    else:
        v = dict(value)
        seconds = (v.get("days", 0) * 86400 + v.get("hours", 0) * 3600 + v.get("minutes", 0) * 60
                   + v.get("seconds", 0))
    share = max(int(math.floor(seconds / n)), 1)
    return f"{share // 86400:02d}:{share % 86400 // 3600:02d}:{share % 3600 // 60:02d}:{share % 60:02d}"


def is_parallel(cfg: DictConfig) -> bool:
    return bool((cfg.get("ensemble") or {}).get("parallel", False))


def member_config(cfg: DictConfig, index: int, data: dict[str, Any], run_dir: Path,
                  base_members: int | None = None) -> DictConfig:
    """The config of committee member ``index``: its own run directory, seed ``seed + index`` for weights and
    batch order, the data and split of ``seed`` (``data`` resolved), a share of ``trainer.max_time`` (all of it
    with ``ensemble.parallel``); the test split and figures are left to the committee.  Fine-tuned from a committee
    of ``base_members`` (``init_from``), member i starts from the base's member i mod ``base_members``."""
    member = cfg.copy()
    n = 1 if is_parallel(cfg) else options(cfg)[1]
    with open_dict(member):
        member.run_dir = str(run_dir)
        member.seed = int(cfg.seed) + index
        member.data = OmegaConf.create(data)
        if "seed" in member.data:  # the training shuffle
            member.data.seed = int(cfg.seed) + index
        member.ensemble.size = 1
        member.ensemble.parallel = False
        if base_members:
            member.init_from = f"{cfg.init_from}#{index % base_members}"
        member.test = False
        member.figures = False
        member.export = True
        member.trainer.max_time = _max_time_share(OmegaConf.to_container(cfg.trainer).get("max_time"), n)
    return member


def _train_member(member: dict[str, Any], overrides: list[str], threads: int) -> str:
    """One committee member in a worker process (``ensemble.parallel``); the path of its ``model.pt``."""
    from potentials.training.run import run

    torch.set_num_threads(threads)
    return str(run(OmegaConf.create(member), overrides=overrides)["model"])


def _train_in_processes(cfg: DictConfig, todo: dict[int, DictConfig]) -> dict[int, Path]:
    """Train the members ``todo`` (index → config) as that many processes at once, each with an equal share of
    this process's torch threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from potentials.training.finetune import explicit_overrides

    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if (isinstance(devices, int) and devices > 1) or int(nodes or 1) > 1 or isinstance(devices, (list, tuple)):
        raise PotentialsInputError(f"ensemble.parallel trains committee members as separate processes on one "
                                   f"device each; it cannot be combined with trainer.devices={devices}, "
                                   f"trainer.num_nodes={nodes} (set ensemble.parallel=false)")
    threads = max(torch.get_num_threads() // len(todo), 1)
    overrides = explicit_overrides()
    log.info("committee: training members %s as %d processes, %d torch thread(s) each",
             ", ".join(str(i + 1) for i in todo), len(todo), threads)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or Lightning state
    with ProcessPoolExecutor(max_workers=len(todo), mp_context=context) as pool:
        futures = {i: pool.submit(_train_member, OmegaConf.to_container(member), overrides, threads)
                   for i, member in todo.items()}
        return {i: Path(future.result()) for i, future in futures.items()}


def run_committee(cfg: DictConfig, run_one) -> dict[str, Any]:
    """Train the committee member by member with ``run_one`` (a single run), then write the committee's
    ``model.pt`` and ``metrics.json``; returns the summary a single run returns."""
    import json

    from hydra.utils import instantiate

    from potentials.export import load, save

    n = options(cfg)[1]
    if str(cfg.resume) not in ("auto", "never"):
        raise PotentialsInputError(f"a committee resumes member by member: resume must be auto or never, "
                                   f"got {cfg.resume}")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    base_members = committee_size(cfg.init_from) if cfg.get("init_from") else None
    files: list[Path | None] = []
    todo: dict[int, DictConfig] = {}
    for i in range(n):
        member_dir = run_dir / "members" / str(i)
        done = member_dir / "model.pt"
        if str(cfg.resume) == "auto" and done.is_file():
            log.info("committee member %d/%d: already trained (%s)", i + 1, n, done)
            files.append(done)
            continue
        files.append(None)
        todo[i] = member_config(cfg, i, data, member_dir, base_members)
    if todo and is_parallel(cfg):
        for i, path in _train_in_processes(cfg, todo).items():
            files[i] = path
    for i, member in todo.items():
        if files[i] is not None:
            continue
        log.info("committee member %d/%d: %s", i + 1, n, member.run_dir)
        summary = run_one(member)
        if not summary.get("_global_zero", True):
            return summary  # under DDP, rank 0 writes the committee
        files[i] = Path(summary["model"])

    members = [load(f, dtype=cfg.dtype) for f in files]
    ensemble = EnsemblePotential(members, kind="committee")
    dm = instantiate(OmegaConf.create(data))
    dm.setup("fit")
    calibration = fit_calibration(ensemble, dm.splits["val"])
    summary: dict[str, Any] = {"run_dir": str(run_dir), "_global_zero": True,
                               "num_parameters": sum(p.numel() for p in ensemble.parameters()),
                               "ensemble": {"kind": "committee", "size": n, "calibration": calibration},
                               "members": [str(f) for f in files]}
    if cfg.test and len(dm.splits["test"]):
        metrics = uncertainty_summary(ensemble, dm.splits["test"], run_dir / "figures" if cfg.figures else None)
        shown = ("energy_mae", "force_mae", "force_rmse", "force_cos", "stress_mae")
        summary["test"] = {f"test/{k}": float(metrics[k]) for k in shown if k in metrics}
        summary["uncertainty"] = metrics.get("uncertainty")
    if cfg.export:
        path = save(ensemble, run_dir / "model.pt", members[0].metadata["model_config"],
                    extra={"data": cfg.data.name, "test": summary.get("test", {}), "members": n})
        summary["model"] = str(path)
    split = "test" if dm.splits["test"] else "train"
    summary["_demo_atoms"] = dm.splits[split][0].to_atoms()
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    (run_dir / "metrics.json").write_text(json.dumps(public, indent=2))
    summary["metrics"] = str(run_dir / "metrics.json")
    return summary
