"""``potentials relax MODEL STRUCTURES ...``: relax structures with a trained model and print a summary.

STRUCTURES are files (every frame of a multi-frame file is relaxed) or folders (every file ASE or pymatgen
reads directly inside them). Each structure gets a trajectory ``<name>.traj`` and its relaxed structure
``<name>_relaxed.<ext>`` in ``--out``; ``summary.json`` there repeats the printed table.

With ``--batch-size N`` and/or ``--max-atoms M`` the structures are relaxed together with FIRE, up to N structures
and M atoms per model call, each with its own convergence (same steps as ASE's FIRE). A structure that cannot be
relaxed (an element the model never saw, overlapping atoms, ``--cell`` on a non-periodic structure) is reported
and the others are relaxed; the exit code is then 1, as when a relaxation does not converge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from potentials.cli.options import add_model_argument, add_runtime_options, collect_structures_or_exit
from potentials.relax import OPTIMIZERS, relax
from potentials.structure_io import WRITE_FORMATS, write_structure


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
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="relax up to N structures per model call (FIRE only; default: one by one through ASE)")
    p.add_argument("--max-atoms", type=int, default=None, metavar="M",
                   help="at most M atoms per model call when batching (a larger structure runs alone)")
    p.add_argument("--out", default="relaxed", help="output folder (default ./relaxed)")
    p.add_argument("--format", default="extxyz", type=str.lower, choices=sorted(WRITE_FORMATS),
                   help="format of the relaxed structures (default extxyz, which keeps energy, forces and stress; "
                        "vasp and poscar both write POSCAR files named *.vasp)")
    add_runtime_options(p, "float64", "tight relaxations")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from potentials.calculator import PotentialCalculator

    found = collect_structures_or_exit(args.structures)
    batched = args.batch_size is not None or args.max_atoms is not None
    if batched and args.max_uncertainty is not None:
        raise SystemExit("error: --max-uncertainty watches one structure at a time; drop --batch-size/--max-atoms")
    if batched and args.optimizer != "FIRE":
        raise SystemExit("error: --batch-size and --max-atoms relax with FIRE; drop --optimizer or use FIRE")
    if (args.batch_size is not None and args.batch_size < 1) or (args.max_atoms is not None and args.max_atoms < 1):
        raise SystemExit("error: --batch-size and --max-atoms must be positive")
    calc = PotentialCalculator.from_file(args.model, device=args.device, dtype=args.dtype,
                                           kernels=args.kernels,
                                           compile=args.compile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names, structures = list(found.names), list(found.structures)
    rows: list[dict | None] = [None] * len(names)
    bar = tqdm(total=len(found), unit="structure", desc="relaxing", disable=args.no_progress, file=sys.stderr)

    def done(i: int, result) -> None:
        name, atoms = names[i], structures[i]
        if isinstance(result, ValueError):
            bar.write(f"error: structure {name}: {result}", file=sys.stderr)
            rows[i] = {"structure": name, "atoms": len(atoms), "converged": False, "error": str(result)}
        else:
            target = write_structure(result.atoms, out, f"{name}_relaxed", args.format)
            rows[i] = {"structure": name, "atoms": len(atoms), "converged": result.converged,
                       "steps": result.steps, "energy_eV": result.final_energy,
                       "energy_per_atom_eV": result.final_energy / len(atoms), "fmax_eV_per_A": result.final_fmax,
                       "initial_energy_eV": result.initial_energy, "initial_fmax_eV_per_A": result.initial_fmax,
                       "output": str(target), **({"uncertainty": result.uncertainty} if result.uncertainty else {})}
        bar.update(1)

    if batched:
        from potentials.batch_relax import relax_many

        relax_many(structures, calc.potential, fmax=args.fmax, steps=args.steps, cell=args.cell,
                   batch_size=args.batch_size or len(structures), max_atoms=args.max_atoms,
                   trajectories=[out / f"{name}.traj" for name in names], on_done=done)
    else:
        for i, (name, atoms) in enumerate(zip(names, structures, strict=True)):
            bar.set_postfix_str(name[:30])
            try:
                result = relax(atoms, calc, fmax=args.fmax, steps=args.steps, optimizer=args.optimizer,
                               cell=args.cell, trajectory=out / f"{name}.traj",
                               max_uncertainty=args.max_uncertainty, stop_on_uncertainty=args.stop_on_uncertainty,
                               uncertainty_log=out / f"{name}_uncertainty.log")
            except ValueError as err:  # bad input: reported, the other structures go on
                result = err
            done(i, result)
    bar.close()
    print(format_table(rows))
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    n_conv = sum(r["converged"] for r in rows)
    skipped = f", {len(found.skipped)} unreadable files skipped" if found.skipped else ""
    n_bad = sum("error" in r for r in rows)
    rejected = f", {n_bad} rejected (see errors above)" if n_bad else ""
    print(f"\n{n_conv}/{len(rows)} converged to fmax < {args.fmax} eV/Å{rejected}{skipped}; "
          f"relaxed structures, trajectories and summary.json written to {out}/")
    return 0 if n_conv == len(rows) else 1


def format_table(rows: list[dict]) -> str:
    """The summary table: structure, atoms, converged, steps, final energy (eV, eV/atom), fmax (eV/Å)."""
    header = f"{'structure':<28} {'atoms':>5} {'conv':>5} {'steps':>5} {'E final (eV)':>14} {'E/atom':>10} {'fmax':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['structure'][:28]:<28} {r['atoms']:>5} {'ERROR':>5}  {r['error'][:60]}")
            continue
        lines.append(f"{r['structure'][:28]:<28} {r['atoms']:>5} {'yes' if r['converged'] else 'NO':>5} "
                     f"{r['steps']:>5} {r['energy_eV']:>14.5f} {r['energy_per_atom_eV']:>10.5f} "
                     f"{r['fmax_eV_per_A']:>8.4f}")
    return "\n".join(lines)
