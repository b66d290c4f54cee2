"""Figures for evaluations and MD runs (matplotlib, Agg canvas; no pyplot state, safe without a display).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`save` writes it as PNG. Parity plots switch
from a scatter to a hexbin density (log colour scale) when there are many points.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from potentials.evaluate import Predictions

#: Above this many points a parity plot is drawn as a hexbin density instead of a scatter.
SCATTER_LIMIT = 20_000
BLUE, ORANGE, GREY = "#1f5f99", "#d9762b", "#555555"


def _figure(width: float = 4.4, height: float = 4.0, rows: int = 1, sharex: bool = False) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=sharex)
    return fig, axes


def save(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG to ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _note(ax, text: str) -> None:
    ax.text(0.04, 0.96, text, transform=ax.transAxes, va="top", ha="left", fontsize=8.5,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.8", "alpha": 0.9})


def parity(ref: np.ndarray, pred: np.ndarray, *, label: str, unit: str, note: str = "", title: str = "") -> Figure:
    """Predicted against reference values with the y = x line.

    Args:
        ref, pred: [M] values in ``unit``.
        label: quantity name for the axes (e.g. ``"energy per atom"``).
    """
    fig, ax = _figure()
    ref, pred = np.asarray(ref, float).ravel(), np.asarray(pred, float).ravel()
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    pad = 0.04 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    if len(ref) > SCATTER_LIMIT:
        hb = ax.hexbin(ref, pred, gridsize=80, bins="log", cmap="viridis", mincnt=1, extent=(lo, hi, lo, hi))
        fig.colorbar(hb, ax=ax, label="count", shrink=0.8)
    else:
        size = 12 if len(ref) < 500 else 4
        ax.scatter(ref, pred, s=size, alpha=0.6, color=BLUE, edgecolors="none", rasterized=True)
    ax.plot([lo, hi], [lo, hi], color=GREY, lw=0.8, ls="--")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"reference {label} ({unit})", ylabel=f"predicted {label} ({unit})")
    ax.set_aspect("equal")
    if note:
        _note(ax, note)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def energy_parity(pred: Predictions, metrics: dict, title: str = "") -> Figure:
    """Energy per atom (eV/atom), structures with an energy label."""
    m = pred.has_energy
    n = pred.num_atoms[m]
    note = f"MAE {metrics['energy_mae']:.2f} meV/atom\nRMSE {metrics['energy_rmse']:.2f} meV/atom\n{m.sum()} structures"
    return parity(pred.energy_ref[m] / n, pred.energy_pred[m] / n, label="energy", unit="eV/atom", note=note,
                  title=title)


def force_parity(pred: Predictions, metrics: dict, free_atoms_only: bool = False, title: str = "") -> Figure:
    """Force components (eV/Å) of the atoms the metrics count."""
    f = pred.force_mask(free_atoms_only)
    note = (f"MAE {metrics['force_mae']:.1f} meV/Å\nRMSE {metrics['force_rmse']:.1f} meV/Å\n"
            f"cos {metrics['force_cos']:.4f}\n{f.sum()} atoms" + (" (free)" if free_atoms_only else ""))
    return parity(pred.forces_ref[f], pred.forces_pred[f], label="force component", unit="eV/Å", note=note,
                  title=title)


def force_error_histogram(pred: Predictions, free_atoms_only: bool = False, title: str = "") -> Figure:
    """Distribution of the per-atom force error |F_pred − F_ref| (meV/Å), log-scaled counts."""
    f = pred.force_mask(free_atoms_only)
    err = np.linalg.norm(pred.forces_pred[f] - pred.forces_ref[f], axis=1) * 1e3
    fig, ax = _figure(4.8, 3.4)
    ax.hist(err, bins=60, color=BLUE, alpha=0.85, log=True)
    for q, name, ls in ((50, "median", "--"), (99, "99th percentile", ":")):
        v = float(np.percentile(err, q))
        ax.axvline(v, color=ORANGE, ls=ls, lw=1.2, label=f"{name} {v:.0f} meV/Å")
    ax.set(xlabel="per-atom force error |ΔF| (meV/Å)", ylabel="atoms")
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def per_element_force_errors(metrics: dict, title: str = "") -> Figure:
    """Force MAE and RMSE (meV/Å) per element, with the number of atoms above each pair of bars."""
    from ase.data import atomic_numbers

    per = metrics["per_element"]
    symbols = sorted(per, key=lambda s: atomic_numbers[s])
    x = np.arange(len(symbols))
    mae = [per[s]["force_mae"] for s in symbols]
    rmse = [per[s]["force_rmse"] for s in symbols]
    fig, ax = _figure(max(3.2, 1.0 + 0.7 * len(symbols)), 3.4)
    ax.bar(x - 0.2, mae, 0.4, color=BLUE, label="MAE")
    bars = ax.bar(x + 0.2, rmse, 0.4, color=ORANGE, label="RMSE")
    for bar, s in zip(bars, symbols, strict=True):
        ax.annotate(f"n={per[s]['n_atoms']}", (bar.get_x(), bar.get_height()), textcoords="offset points",
                    xytext=(0, 2), ha="center", fontsize=7.5, color=GREY)
    ax.set_xticks(x, symbols)
    ax.set(ylabel="force error (meV/Å)", ylim=(0, 1.35 * max(rmse)))
    ax.legend(fontsize=8, frameon=False, loc="upper left", ncols=2)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def evaluation_figures(pred: Predictions, metrics: dict, free_atoms_only: bool = False, title: str = ""
                       ) -> dict[str, Figure]:
    """Every evaluation figure the labels allow: ``energy_parity``, ``force_parity``, ``force_error_hist``,
    ``force_error_per_element``."""
    figures = {}
    if "energy_mae" in metrics:
        figures["energy_parity"] = energy_parity(pred, metrics, title)
    if "force_mae" in metrics:
        figures["force_parity"] = force_parity(pred, metrics, free_atoms_only, title)
        figures["force_error_hist"] = force_error_histogram(pred, free_atoms_only, title)
        figures["force_error_per_element"] = per_element_force_errors(metrics, title)
    return figures


def md_energies(time_ps: np.ndarray, etot: np.ndarray, epot: np.ndarray, temperature: np.ndarray, n_atoms: int, *,
                target_K: float | None = None, drift: float | None = None, title: str = "") -> Figure:
    """Total-energy deviation, potential energy and temperature along an MD run.

    Args:
        time_ps: [S] times, ps.
        etot, epot: [S] total and potential energies, eV (whole system).
        temperature: [S] instantaneous temperature, K.
        n_atoms: atoms in the system (energies are shown per atom).
        target_K: thermostat target, drawn as a line.
        drift: fitted total-energy drift, meV/atom/ps (drawn as the fitted line).
    """
    fig, (a0, a1, a2) = _figure(5.2, 5.6, rows=3, sharex=True)
    de = (etot - etot[0]) / n_atoms * 1e3
    a0.plot(time_ps, de, color=BLUE, lw=1.0)
    if drift is not None:
        fit = np.polyfit(time_ps, de, 1)
        a0.plot(time_ps, np.polyval(fit, time_ps), color=ORANGE, ls="--", lw=1.0,
                label=f"drift {drift:.3g} meV/atom/ps")
        a0.legend(fontsize=8, frameon=False)
    a0.set_ylabel("ΔE_tot (meV/atom)")
    a1.plot(time_ps, epot / n_atoms, color=BLUE, lw=1.0)
    a1.set_ylabel("E_pot (eV/atom)")
    a2.plot(time_ps, temperature, color=BLUE, lw=1.0)
    if target_K is not None:
        a2.axhline(target_K, color=GREY, ls="--", lw=0.8)
    a2.set(ylabel="T (K)", xlabel="time (ps)")
    if title:
        a0.set_title(title, fontsize=10)
    return fig
