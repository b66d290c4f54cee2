"""Evaluate a trained potential on labelled structures: batched predictions, error metrics and figures.

Used by ``potentials evaluate`` and, at the end of training, for the test split (:func:`report_split`).
Metrics are those of :mod:`potentials.metrics`, which training logs too: energy errors per atom in meV/atom, force
errors per Cartesian component in meV/Å, the force cosine per atom, stress errors per tensor component in GPa;
per-element force errors group atoms by element.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from potentials import keys
from potentials import metrics as definitions
from potentials.graph import AtomicGraph
from potentials.potential import Potential

#: The metrics written to ``metrics.json`` and their units.
UNITS = {name: definitions.UNITS[name] for name in ("energy_mae", "energy_rmse", "force_mae", "force_rmse", "force_cos",
                                                    "stress_mae", "stress_rmse")}
_FLOAT_FIELDS = (keys.POS, keys.CELL, keys.CELL_OFFSETS, keys.ENERGY, keys.FORCES, keys.STRESS)


@dataclass
class Predictions:
    """Reference labels and predictions of a set of structures, as float64 numpy arrays (NaN: no label).

    Per structure (B): ``num_atoms`` [B]; ``energy_ref``, ``energy_pred`` [B] eV; ``stress_ref``, ``stress_pred``
    [B, 3, 3] eV/Å³ (ASE sign); ``has_energy``, ``has_forces``, ``has_stress`` [B] bool.
    Per atom (N = Σ num_atoms): ``z`` [N]; ``structure`` [N] (index of its structure); ``fixed`` [N] bool;
    ``forces_ref``, ``forces_pred`` [N, 3] eV/Å.
    A model with uncertainty adds ``energy_std`` [B] eV and ``forces_std`` [N] eV/Å (None otherwise).
    """

    num_atoms: np.ndarray
    energy_ref: np.ndarray
    energy_pred: np.ndarray
    stress_ref: np.ndarray
    stress_pred: np.ndarray
    has_energy: np.ndarray
    has_forces: np.ndarray
    has_stress: np.ndarray
    z: np.ndarray
    structure: np.ndarray
    fixed: np.ndarray
    forces_ref: np.ndarray
    forces_pred: np.ndarray
    energy_std: np.ndarray | None = None
    forces_std: np.ndarray | None = None

    def force_mask(self, free_atoms_only: bool = False) -> np.ndarray:
        """[N] bool: atoms whose force label counts (of structures with forces; without fixed atoms if asked)."""
        mask = self.has_forces[self.structure]
        return mask & ~self.fixed if free_atoms_only else mask

    def save(self, path: str | os.PathLike) -> Path:
        """Write every array to a compressed ``.npz``."""
        np.savez_compressed(path, **{k: v for k, v in asdict(self).items() if v is not None})
        return Path(path)


def read_labelled(path: str | os.PathLike, *, index: str = ":", energy_unit: str = "eV", energy_key: str | None = None,
                  forces_key: str | None = None, stress_key: str | None = None, format: str | None = None
                  ) -> list[Atoms]:
    """Labelled structures from an MD17/rMD17 ``.npz`` or any file ``ase.io.read`` understands (extxyz, traj, db).

    Args:
        path: the data file; ``.npz`` goes to :func:`potentials.datasets.md17.read`, anything else to
            :func:`potentials.datasets.ase_files.read` with the remaining arguments.
        index: frames to use, as in ``ase.io.read`` (``":"``, ``"::10"``, ``"-100:"``).
    """
    from ase.io.formats import string2index

    from potentials.datasets import ase_files, md17

    path = Path(path)
    if path.suffix.lower() == ".npz":
        frames = md17.read(path)
        selector = string2index(index)
        return frames[selector] if isinstance(selector, slice) else [frames[selector]]
    return ase_files.read(path, index=index, energy_unit=energy_unit, energy_key=energy_key, forces_key=forces_key,
                          stress_key=stress_key, format=format)


def to_graphs(frames: Sequence[Atoms], potential: Potential, dtype: torch.dtype) -> list[AtomicGraph]:
    """Graphs at the potential's cutoff; raises ``ValueError`` naming the first frame with an unknown element."""
    known = set(potential.elements)
    graphs = []
    for k, atoms in enumerate(frames):
        where = f"{atoms.info.get('source', 'structure')} frame {atoms.info.get('frame', k)}"
        unknown = sorted(set(atoms.numbers.tolist()) - known) if known else []
        if unknown:
            names = ", ".join(chemical_symbols[u] for u in unknown)
            trained = ", ".join(chemical_symbols[u] for u in sorted(known))
            raise ValueError(f"{where}: contains elements the model never saw: {names} (trained on: {trained})")
        graph = AtomicGraph.from_atoms(atoms, potential.cutoff, dtype=dtype)
        graph.validate(where)
        graphs.append(graph)
    return graphs


def predict_in_eval_mode(potential: Potential, graphs: Iterable[AtomicGraph], *, batch_size: int = 16
                         ) -> Predictions:
    """:func:`predict` with ``potential`` in eval mode, its training flag restored afterwards (for calls from
    inside a training run)."""
    was_training = potential.training
    potential.eval()
    try:
        return predict(potential, graphs, batch_size=batch_size)
    finally:
        potential.train(was_training)


def predict(potential: Potential, graphs: Iterable[AtomicGraph], *, batch_size: int = 16,
            progress: bool = False) -> Predictions:
    """Energies, forces and (where labelled) stress of ``graphs`` in batches, on the potential's device and dtype.

    Args:
        potential: the model, evaluated as it is (call ``.eval()`` first for inference).
        graphs: :class:`AtomicGraph` objects with labels (missing labels are NaN and masked).
        batch_size: structures per forward pass.
        progress: show a tqdm progress bar over structures.
    """
    from torch_geometric.loader import DataLoader
    from tqdm import tqdm

    graphs = list(graphs)
    ref = potential.scale
    parts: dict[str, list[np.ndarray]] = {name: [] for name in Predictions.__dataclass_fields__}
    bar = tqdm(total=len(graphs), unit="structure", desc="evaluating", disable=not progress)
    for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False):
        batch = batch.to(ref.device)
        for name in _FLOAT_FIELDS:
            batch[name] = batch[name].to(ref.dtype)
        stress = bool(batch.has_stress.any())
        out = potential(batch, compute_forces=True, compute_stress=stress, create_graph=False)
        n = batch.num_graphs
        nan33 = torch.full((n, 3, 3), float("nan"), dtype=torch.float64)
        offset = sum(len(a) for a in parts["num_atoms"])
        values = {
            "num_atoms": batch.num_atoms, "energy_ref": batch.energy, "energy_pred": out[keys.ENERGY],
            "stress_ref": batch.stress.reshape(n, 3, 3), "stress_pred": out[keys.STRESS] if stress else nan33,
            "has_energy": batch.has_energy, "has_forces": batch.has_forces, "has_stress": batch.has_stress,
            "z": batch.z, "structure": batch.batch + offset, "fixed": batch.fixed, "forces_ref": batch.forces,
            "forces_pred": out[keys.FORCES],
        }
        if "energy_std" in out:  # a model with uncertainty
            values["energy_std"], values["forces_std"] = out["energy_std"], out["forces_std"]
        for name, value in values.items():
            value = value.detach().cpu()
            parts[name].append((value.double() if value.is_floating_point() else value).numpy())
        bar.update(n)
    bar.close()
    if not parts["num_atoms"]:
        raise ValueError("no structures to evaluate")
    return Predictions(**{name: np.concatenate(chunks) for name, chunks in parts.items() if chunks})


def compute_metrics(pred: Predictions, free_atoms_only: bool = False, calibration: dict[str, float] | None = None
                    ) -> dict[str, Any]:
    """Error metrics in reporting units (see :data:`UNITS`, defined in :mod:`potentials.metrics`); a metric without
    labels is left out.

    Returns:
        ``n_structures``, ``n_atoms``, the counts each metric is taken over (``n_energy`` structures,
        ``n_force_atoms`` atoms, ``n_stress`` structures), ``energy_mae``/``energy_rmse`` (meV/atom),
        ``force_mae``/``force_rmse`` (meV/Å, over components), ``force_cos`` (mean over atoms),
        ``stress_mae``/``stress_rmse`` (GPa, over the 9 components), ``per_element``
        (symbol → ``n_atoms``, ``force_mae``, ``force_rmse``), ``free_atoms_only`` and ``units``; for a model
        with uncertainty, ``uncertainty`` (:func:`potentials.uncertainty.calibration_report`, with the model's
        ``calibration`` scalars).
    """
    t, of = torch.from_numpy, definitions.metrics_of
    m: dict[str, Any] = {"n_structures": int(len(pred.num_atoms)), "n_atoms": int(pred.num_atoms.sum())}
    e = pred.has_energy
    m["n_energy"] = int(e.sum())
    if e.any():
        energy = definitions.energy_terms(t(pred.energy_pred), t(pred.energy_ref), t(pred.num_atoms), t(e))
        m.update(of(energy, ("energy_mae", "energy_rmse")))
    f = pred.force_mask(free_atoms_only)
    m["n_force_atoms"] = int(f.sum())
    if f.any():
        forces_pred, forces_ref = t(pred.forces_pred[f]), t(pred.forces_ref[f])
        m.update(of(definitions.force_terms(forces_pred, forces_ref), ("force_mae", "force_rmse", "force_cos")))
        m["per_element"] = {}
        for z in np.unique(pred.z[f]):
            sel = t(pred.z[f] == z)
            forces = of(definitions.force_terms(forces_pred[sel], forces_ref[sel]), ("force_mae", "force_rmse"))
            m["per_element"][chemical_symbols[z]] = {"n_atoms": int(sel.sum()), **forces}
    stress = definitions.stress_terms(t(pred.stress_pred), t(pred.stress_ref), t(pred.has_stress))
    m["n_stress"] = stress["stress_ae"].numel() // 9
    if m["n_stress"]:
        m.update(of(stress, ("stress_mae", "stress_rmse")))
    m["free_atoms_only"] = bool(free_atoms_only)
    m["units"] = UNITS
    if pred.forces_std is not None:
        from potentials.uncertainty import calibration_report

        m["uncertainty"] = calibration_report(pred, calibration)
    return m


def write_report(pred: Predictions, out_dir: str | os.PathLike, *, free_atoms_only: bool = False,
                 prefix: str = "", title: str = "", calibration: dict[str, float] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Path], dict]:
    """Metrics JSON, predictions ``.npz`` and PNG figures in ``out_dir``.

    Returns:
        (metrics, written files by name, matplotlib figures by name).
    """
    from potentials import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(pred, free_atoms_only, calibration)
    figures = plots.evaluation_figures(pred, metrics, free_atoms_only=free_atoms_only, title=title)
    if "uncertainty" in metrics:  # binned predicted std against RMSE
        from potentials.uncertainty import calibration_figure

        figures["uncertainty_calibration"] = calibration_figure(metrics["uncertainty"], title)
    files = {name: plots.save(fig, out / f"{prefix}{name}.png") for name, fig in figures.items()}
    files["metrics"] = out / f"{prefix}metrics.json"
    files["metrics"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    files["predictions"] = pred.save(out / f"{prefix}predictions.npz")
    return metrics, files, figures


def evaluate_file(model: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike, *,
                  device: str = "cpu", dtype: str = "float32", batch_size: int = 16, free_atoms_only: bool = False,
                  progress: bool = False, kernels: str | None = None, compile: bool | None = None,
                  **read_options: Any
                  ) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate the model file ``model`` on the labelled structures in ``data``; write the report to ``out_dir``.

    Args:
        model: a file written by training (``<run dir>/model.pt``).
        data: labelled structures (see :func:`read_labelled`; ``read_options`` are passed on).
        out_dir: folder for ``metrics.json``, ``predictions.npz`` and the figures.
        device, dtype: where and in which precision to run the model.
        batch_size: structures per forward pass.
        free_atoms_only: leave atoms held fixed (FixAtoms, OC20's subsurface) out of the force metrics.
        progress: show a progress bar.
        kernels: replaces the file's choice of implementation when given (see :mod:`potentials.accel`).
        compile: replaces the file's ``runtime.compile`` when given (``torch.compile``; docs/performance.md).

    Returns:
        (metrics, written files by name).
    """
    from potentials.export import load

    potential = load(model, device=device, dtype=dtype, compile=compile)
    potential.kernels = kernels or potential.kernels
    frames = read_labelled(data, **read_options)
    if not frames:
        raise ValueError(f"file '{Path(data).name}': no structures selected")
    if not any(getattr(a.calc, "results", None) for a in frames):
        raise ValueError(f"file '{Path(data).name}': no energy, forces or stress labels to compare with")
    graphs = to_graphs(frames, potential, getattr(torch, dtype))
    if free_atoms_only and not any(bool(g.fixed.any()) for g in graphs):
        raise ValueError(f"file '{Path(data).name}': free_atoms_only asked, but no atom is fixed (no FixAtoms "
                         "constraint in any frame)")
    pred = predict(potential, graphs, batch_size=batch_size, progress=progress)
    metrics, files, _ = write_report(pred, out_dir, free_atoms_only=free_atoms_only, title=Path(data).name,
                                     calibration=getattr(potential, "calibration", None))
    return metrics, files


def report_split(potential: Potential, graphs: Sequence[AtomicGraph], out_dir: str | os.PathLike, *,
                 split: str = "test", loggers: Iterable = (), free_atoms_only: bool = False,
                 batch_size: int = 16, step: int | None = None) -> dict[str, str]:
    """Evaluation figures of one data split for a training run: files in ``out_dir`` and images on the loggers.

    PNGs, ``<split>_metrics.json`` (with per-element errors) and ``<split>_predictions.npz`` go to ``out_dir``;
    Weights & Biases and TensorBoard get one image per figure, keyed ``<split>/<figure>``; other loggers (CSV) only
    the files.
    """
    pred = predict_in_eval_mode(potential, graphs, batch_size=batch_size)
    _, files, figures = write_report(pred, out_dir, free_atoms_only=free_atoms_only, prefix=f"{split}_",
                                     title=f"{split} split")
    log_figures(loggers, figures, {k: files[k] for k in figures}, split=split, step=step)
    return {name: str(path) for name, path in files.items()}


def log_figures(loggers: Iterable, figures: dict, files: dict[str, Path], *, split: str, step: int | None) -> None:
    """Send figures to the Weights & Biases and TensorBoard loggers among ``loggers`` (others are left alone)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers or ():
        if isinstance(logger, WandbLogger):  # one history step holding every figure
            import wandb

            logger.log_metrics({f"{split}/{name}": wandb.Image(str(path)) for name, path in files.items()})
        elif isinstance(logger, TensorBoardLogger):
            for name, fig in figures.items():
                logger.experiment.add_figure(f"{split}/{name}", fig, global_step=step or 0, close=False)
            logger.experiment.flush()
