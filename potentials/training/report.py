"""What ``train.py`` prints at the end: where things went, the test metrics, and a demo relaxation."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from potentials.training.metrics import UNITS


def demo_relax(model_path: str, atoms, cfg, device: str = "cpu") -> dict[str, Any]:
    """Rattle a held-out structure by 0.1 Å and relax it with the exported model through ASE on ``device`` (the
    device training ran on)."""
    from potentials.calculator import PotentialCalculator
    from potentials.relax import relax

    atoms = atoms.copy()
    atoms.calc = None
    atoms.rattle(0.1, seed=cfg.seed)
    calc = PotentialCalculator.from_file(model_path, device=device, dtype=cfg.dtype)
    result = relax(atoms, calc, fmax=0.05, steps=300, optimizer="FIRE")
    return {"formula": atoms.get_chemical_formula(), "converged": result.converged, "steps": result.steps,
            "energy_before_eV": result.initial_energy, "energy_after_eV": result.final_energy,
            "fmax_before": result.initial_fmax, "fmax_after": result.final_fmax}


def print_summary(summary: dict[str, Any]) -> None:
    lines = ["", "=" * 72, "Training finished", "=" * 72, f"run directory : {summary['run_dir']}"]
    if summary.get("model"):
        lines.append(f"exported model: {summary['model']}")
    if summary.get("metrics"):
        lines.append(f"metrics       : {summary['metrics']}")
    if summary.get("figures"):
        lines.append(f"figures       : {os.path.dirname(summary['figures']['metrics'])}/ (test split)")
    if summary.get("best_checkpoint"):
        lines.append(f"checkpoint    : {summary['best_checkpoint']}")
    lines.append(f"parameters    : {summary['num_parameters']:,}")
    test = summary.get("test") or {}
    if test:
        lines.append("test split (EMA weights of the best checkpoint):")
        shown = [(key.split("/")[-1], value) for key, value in test.items() if key.split("/")[-1] in UNITS]
        width = max((len(name) for name, _ in shown), default=0)
        for name, value in shown:
            lines.append(f"  {name:<{width}} {value:12.4f} {UNITS[name]}")
        if "test/force_mae" in test and np.isfinite(test.get("force_rms_meV_per_A", np.nan)):
            ratio = test["test/force_mae"] / test["force_rms_meV_per_A"]
            lines.append(f"  force MAE / force RMS of the test set = {ratio:.3f}")
    demo = summary.get("demo_relax")
    if demo:
        lines.append(
            f"demo relaxation of a rattled {demo['formula']} (FIRE, fmax 0.05 eV/Å): "
            f"{'converged' if demo['converged'] else 'NOT converged'} in {demo['steps']} steps, "
            f"E {demo['energy_before_eV']:.4f} → {demo['energy_after_eV']:.4f} eV, "
            f"fmax {demo['fmax_before']:.3f} → {demo['fmax_after']:.3f} eV/Å"
        )
    if summary.get("model"):
        lines.append(f"relax your own structure: potentials relax {summary['model']} STRUCTURE.cif --cell")
    print("\n".join(lines))
