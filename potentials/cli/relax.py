"""``potentials relax MODEL STRUCTURE ...``: relax structures with a trained model and print a summary."""

from __future__ import annotations

import argparse
from pathlib import Path

import ase
import ase.io

from potentials.relax import OPTIMIZERS, relax


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relax", help="relax structures (positions, optionally the cell) with a trained model",
                       description=__doc__)
    p.add_argument("model", help="model file written by training (<run dir>/model.pt)")
    p.add_argument("structures", nargs="+", help="structure files: CIF, POSCAR, extxyz, traj, ... (all frames)")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å (default 0.05)")
    p.add_argument("--steps", type=int, default=500, help="maximum optimiser steps (default 500)")
    p.add_argument("--optimizer", default="FIRE", type=str.upper, choices=sorted(OPTIMIZERS))
    p.add_argument("--cell", action="store_true", help="relax the cell too (FrechetCellFilter)")
    p.add_argument("--out", default="relaxed", help="output folder (default ./relaxed)")
    p.add_argument("--format", default=None,
                   help="format of the relaxed structures (extxyz, cif, vasp, ...; default: extxyz)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="precision (default float64: tight relaxations)")
    p.set_defaults(func=main)


def read_structures(path: str) -> list[ase.Atoms]:
    """All frames of ``path`` through ASE, falling back to pymatgen for formats only it reads."""
    try:
        frames = ase.io.read(path, ":")
    except Exception as ase_err:  # noqa: BLE001 - try pymatgen before giving up
        try:
            from pymatgen.core import Structure
            from pymatgen.io.ase import AseAtomsAdaptor

            frames = [AseAtomsAdaptor.get_atoms(Structure.from_file(path))]
        except Exception as pmg_err:  # noqa: BLE001
            raise SystemExit(f"error: cannot read {path}: ASE said: {ase_err}; pymatgen said: {pmg_err}") from None
    return frames if isinstance(frames, list) else [frames]


def main(args: argparse.Namespace) -> int:
    from potentials.calculator import PotentialCalculator

    calc = PotentialCalculator.from_file(args.model, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = args.format or "extxyz"
    ext = {"extxyz": "extxyz", "cif": "cif", "vasp": "vasp", "xyz": "xyz", "traj": "traj"}.get(fmt, fmt)
    rows = []
    for path in args.structures:
        frames = read_structures(path)
        for k, atoms in enumerate(frames):
            name = Path(path).stem + (f"_{k}" if len(frames) > 1 else "")
            result = relax(atoms, calc, fmax=args.fmax, steps=args.steps, optimizer=args.optimizer,
                           cell=args.cell, trajectory=out / f"{name}.traj")
            final = result.atoms.copy()
            final.calc = None
            target = out / f"{name}_relaxed.{ext}"
            ase.io.write(target, final, format=fmt)
            rows.append((name, len(atoms), result, target))
    header = f"{'structure':<28} {'atoms':>5} {'conv':>5} {'steps':>5} {'E final (eV)':>14} {'E/atom':>10} {'fmax':>8}"
    print(header)
    print("-" * len(header))
    for name, n, r, _ in rows:
        print(f"{name[:28]:<28} {n:>5} {'yes' if r.converged else 'NO':>5} {r.steps:>5} {r.final_energy:>14.5f} "
              f"{r.final_energy / n:>10.5f} {r.final_fmax:>8.4f}")
    print(f"\nrelaxed structures and trajectories written to {out}/")
    return 0 if all(r.converged for _, _, r, _ in rows) else 1
