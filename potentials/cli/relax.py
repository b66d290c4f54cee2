"""``potentials relax MODEL STRUCTURES ...``: relax structures with a trained model and print a summary.

STRUCTURES are files (every frame of a multi-frame file is relaxed) or folders (every file ASE or pymatgen
reads directly inside them). Each structure gets a trajectory ``<name>.traj`` and its relaxed structure
``<name>_relaxed.<ext>`` in ``--out``; ``summary.json`` there repeats the printed table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from potentials.cli.options import add_model_argument, add_runtime_options
from potentials.errors import PotentialsInputError
from potentials.relax import OPTIMIZERS, relax
from potentials.structure_io import WRITE_FORMATS, collect_structures, write_structure


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relax", help="relax structures (positions, optionally the cell) with a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("structures", nargs="+",
                   help="structure files (CIF, POSCAR, extxyz, traj, ...; all frames) or folders of them")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å (default 0.05)")
    p.add_argument("--steps", type=int, default=500, help="maximum optimiser steps (default 500)")
    p.add_argument("--optimizer", default="FIRE", type=str.upper, choices=sorted(OPTIMIZERS))
    p.add_argument("--cell", action="store_true", help="relax the cell too (FrechetCellFilter)")
    p.add_argument("--max-uncertainty", type=float, default=None, metavar="X",
                   help="eV/Å: flag steps whose maximum per-atom force std is above X (<name>_uncertainty.log, "
                        "trajectory info); needs a model with uncertainty")
    p.add_argument("--stop-on-uncertainty", action="store_true",
                   help="stop a relaxation at its first step above --max-uncertainty (reported not converged)")
    p.add_argument("--out", default="relaxed", help="output folder (default ./relaxed)")
    p.add_argument("--format", default="extxyz", type=str.lower, choices=sorted(WRITE_FORMATS),
                   help="format of the relaxed structures (default extxyz, which keeps energy, forces and stress; "
                        "vasp and poscar both write POSCAR files named *.vasp)")
    add_runtime_options(p, "float64", "tight relaxations")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from potentials.calculator import PotentialCalculator

    try:
        found = collect_structures(args.structures)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    for path, reason in found.skipped:
        print(f"skipped {path}: {reason.splitlines()[0][:200]}", file=sys.stderr)
    if not len(found):
        raise SystemExit(f"error: no readable structure in {', '.join(args.structures)}")
    calc = PotentialCalculator.from_file(args.model, device=args.device, dtype=args.dtype,
                                           kernels=args.kernels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=len(found), unit="structure", desc="relaxing", disable=args.no_progress, file=sys.stderr)
    for name, atoms in zip(found.names, found.structures, strict=True):
        bar.set_postfix_str(name[:30])
        try:
            result = relax(atoms, calc, fmax=args.fmax, steps=args.steps, optimizer=args.optimizer,
                           cell=args.cell, trajectory=out / f"{name}.traj", max_uncertainty=args.max_uncertainty,
                           stop_on_uncertainty=args.stop_on_uncertainty,
                           uncertainty_log=out / f"{name}_uncertainty.log")
        except (ValueError, PotentialsInputError) as err:
            bar.close()
            raise SystemExit(f"error: structure {name}: {err}") from None
        target = write_structure(result.atoms, out, f"{name}_relaxed", args.format)
        rows.append({"structure": name, "atoms": len(atoms), "converged": result.converged, "steps": result.steps,
                     "energy_eV": result.final_energy, "energy_per_atom_eV": result.final_energy / len(atoms),
                     "fmax_eV_per_A": result.final_fmax, "initial_energy_eV": result.initial_energy,
                     "initial_fmax_eV_per_A": result.initial_fmax, "output": str(target),
                     **({"uncertainty": result.uncertainty} if result.uncertainty else {})})
        bar.update(1)
    bar.close()
    print(format_table(rows))
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    n_conv = sum(r["converged"] for r in rows)
    skipped = f", {len(found.skipped)} unreadable files skipped" if found.skipped else ""
    print(f"\n{n_conv}/{len(rows)} converged to fmax < {args.fmax} eV/Å{skipped}; "
          f"relaxed structures, trajectories and summary.json written to {out}/")
    return 0 if n_conv == len(rows) else 1


def format_table(rows: list[dict]) -> str:
    """The summary table: structure, atoms, converged, steps, final energy (eV, eV/atom), fmax (eV/Å)."""
    header = f"{'structure':<28} {'atoms':>5} {'conv':>5} {'steps':>5} {'E final (eV)':>14} {'E/atom':>10} {'fmax':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['structure'][:28]:<28} {r['atoms']:>5} {'yes' if r['converged'] else 'NO':>5} "
                     f"{r['steps']:>5} {r['energy_eV']:>14.5f} {r['energy_per_atom_eV']:>10.5f} "
                     f"{r['fmax_eV_per_A']:>8.4f}")
    return "\n".join(lines)
