"""``potentials evaluate MODEL DATA``: error metrics and parity plots of a trained model on labelled structures.

DATA is any file ``ase.io.read`` understands with labels (extxyz, traj, ASE db) or an MD17/rMD17 ``.npz``.
Writes ``metrics.json`` (energy MAE/RMSE in meV/atom, force MAE/RMSE in meV/Å and cosine, stress MAE/RMSE in
GPa where labelled, per-element force errors), ``predictions.npz`` and PNG figures (energy and force parity,
force-error histogram, per-element force errors) to ``--out``.  For a model with uncertainty (a committee or a
shallow ensemble) it also reports predicted std against actual error per structure and per atom (Spearman rank
correlation, binned std against RMSE, the stored calibration) under ``uncertainty`` and plots it.
"""

from __future__ import annotations

import argparse
import sys

from potentials.cli.options import add_model_argument, add_runtime_options
from potentials.evaluate import UNITS, evaluate_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics and parity plots of a trained model on labelled structures",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("data", help="labelled structures: extxyz, traj, ASE db, ... or an MD17/rMD17 .npz")
    p.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    p.add_argument("--index", default=":", help="frames to use, as in ase.io.read (default ':' = all; '::10')")
    p.add_argument("--batch-size", type=int, default=16, help="structures per forward pass (default 16)")
    p.add_argument("--free-atoms-only", action="store_true",
                   help="leave fixed atoms (FixAtoms; OC20 subsurface) out of the force metrics")
    p.add_argument("--energy-unit", default="eV", help="energy unit of an ASE-readable file (eV, kcal/mol, ...)")
    p.add_argument("--energy-key", default=None, help="atoms.info key of the reference energy (e.g. REF_energy)")
    p.add_argument("--forces-key", default=None, help="atoms.arrays key of the reference forces (e.g. REF_forces)")
    p.add_argument("--stress-key", default=None, help="atoms.info key of the reference stress (ASE sign)")
    add_runtime_options(p, "float32", "fast, and precise enough for error metrics")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        metrics, files = evaluate_file(
            args.model, args.data, args.out, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
            kernels=args.kernels, compile=args.compile, free_atoms_only=args.free_atoms_only,
            progress=not args.no_progress, index=args.index,
            energy_unit=args.energy_unit, energy_key=args.energy_key, forces_key=args.forces_key,
            stress_key=args.stress_key,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_metrics(metrics, f"{args.model} on {args.data}"))
    print(f"\nwritten to {args.out}/: " + ", ".join(sorted(p.name for p in files.values())))
    return 0


def format_metrics(m: dict, what: str) -> str:
    """A short text report of :func:`potentials.evaluate.compute_metrics` output."""
    lines = [f"{what}: {m['n_structures']} structures, {m['n_atoms']} atoms"]
    rows = (("energy", "energy", "n_energy", "structures"), ("forces", "force", "n_force_atoms", "atoms"),
            ("stress", "stress", "n_stress", "structures"))
    for title, stem, count, noun in rows:
        if f"{stem}_mae" not in m:
            lines.append(f"  {title:<7} no labels")
            continue
        unit = UNITS[f"{stem}_mae"]
        line = f"  {title:<7} MAE {m[f'{stem}_mae']:9.3f}  RMSE {m[f'{stem}_rmse']:9.3f} {unit:<9}"
        if stem == "force":
            line += f" cos {m['force_cos']:.4f}"
        free = ", free atoms only" if stem == "force" and m["free_atoms_only"] else ""
        lines.append(f"{line}  ({m[count]} {noun}{free})")
    if m.get("per_element"):
        lines.append("  force errors per element (meV/Å):")
        for symbol, e in m["per_element"].items():
            lines.append(f"    {symbol:<3} MAE {e['force_mae']:9.3f}  RMSE {e['force_rmse']:9.3f}  "
                         f"({e['n_atoms']} atoms)")
    u = m.get("uncertainty")
    if u:
        scale = ", ".join(f"{k} × {v:.3g}" for k, v in u.get("calibration_scale", {}).items())
        lines.append(f"  uncertainty (calibration: {scale or 'none'}):")
        for level in ("forces_per_atom", "forces_per_structure", "energy_per_structure"):
            if level in u:
                r = u[level]
                lines.append(f"    {level:<21} Spearman {r['spearman']:6.3f}  RMS std {r['rms_std']:.4g}  "
                             f"RMSE {r['rmse']:.4g} {r['unit']}  ({r['n']})")
    return "\n".join(lines)
