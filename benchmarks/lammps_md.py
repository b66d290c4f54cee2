"""Time per MD step: a model in LAMMPS (``potentials.lammps``) against ``potentials md`` (ASE) and the model alone.

Structures: Cu fcc 5x5x5 conventional cells (500 atoms, periodic) and an ethanol molecule (9 atoms, free
boundaries). Every engine integrates NVE with a 1 fs step from the same positions and zero velocities, after
``--warmup`` untimed steps. Columns:

* model: one energy+forces+stress call of the potential on a prebuilt graph;
* model + graph: the same with the neighbour graph built from the structure each call;
* ASE: one step of ASE's velocity Verlet with the calculator (what ``potentials md`` runs);
* LAMMPS: one step of ``fix nve`` with the model attached through ``fix external``.

Without ``--model`` an untrained EGNN with the default training config (64 channels, 3 layers, cutoff 5 Å) is
timed; speed does not depend on the weights. Writes ``benchmarks/results/lammps.md``.

    python -m benchmarks.lammps_md [--model model.pt] [--steps 50] [--device cpu] [--dtype float64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ase
import numpy as np
import torch
from ase import units
from ase.build import bulk, molecule
from ase.md.verlet import VelocityVerlet
from torch_geometric.data import Batch

from potentials.accel import tune_allocator
from potentials.calculator import PotentialCalculator
from potentials.graph import AtomicGraph
from potentials.lammps import attach, import_lammps
from potentials.potential import Potential

RESULTS = Path(__file__).resolve().parent / "results" / "lammps.md"


def structures() -> dict[str, ase.Atoms]:
    cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(5)
    cu.rattle(0.01, seed=1234)
    ethanol = molecule("CH3CH2OH")
    ethanol.cell = np.diag([20.0, 20.0, 20.0])
    ethanol.center()
    ethanol.pbc = False
    return {"Cu 500 (periodic)": cu, "ethanol 9 (free)": ethanol}


def default_potential() -> Potential:
    from potentials.models.egnn import EGNN

    torch.manual_seed(0)
    model = EGNN(cutoff=5.0, avg_num_neighbors=40.0, channels=64, num_layers=3, num_basis=8, envelope_p=6)
    return Potential(model, 5.0, {1: -13.6, 6: -1030.0, 8: -2040.0, 29: -3.7}, scale=0.5)


def per_step(fn, steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - start) / steps


def time_model(potential: Potential, atoms: ase.Atoms, steps: int, device: str, dtype: torch.dtype) -> tuple:
    graph = Batch.from_data_list([AtomicGraph.from_atoms(atoms, potential.cutoff, dtype=dtype)]).to(device)

    def model_only(n: int) -> None:
        for _ in range(n):
            potential(graph, compute_forces=True, compute_stress=True)

    def with_graph(n: int) -> None:
        for _ in range(n):
            g = Batch.from_data_list([AtomicGraph.from_atoms(atoms, potential.cutoff, dtype=dtype)]).to(device)
            potential(g, compute_forces=True, compute_stress=True)

    model_only(2)
    return per_step(model_only, steps), per_step(with_graph, steps)


def time_ase(potential: Potential, atoms: ase.Atoms, steps: int, warmup: int, device: str, dtype: str) -> float:
    atoms = atoms.copy()
    atoms.calc = PotentialCalculator(potential, device=device, dtype=dtype)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(warmup)
    return per_step(dyn.run, steps)


def time_lammps(potential: Potential, atoms: ase.Atoms, steps: int, warmup: int, device: str, dtype: str) -> float:
    lmp = import_lammps().lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    types = sorted(set(atoms.get_chemical_symbols()))
    periodic = bool(atoms.pbc.all())
    lx, ly, lz = np.diag(atoms.cell.array).tolist()
    for command in ["units metal", "atom_style atomic", f"boundary {'p p p' if periodic else 'f f f'}",
                    f"region box block 0 {lx!r} 0 {ly!r} 0 {lz!r} units box", f"create_box {len(types)} box"]:
        lmp.command(command)
    for symbol, p in zip(atoms.get_chemical_symbols(), atoms.positions.tolist(), strict=True):
        lmp.command(f"create_atoms {types.index(symbol) + 1} single {p[0]!r} {p[1]!r} {p[2]!r} units box")
    attach(lmp, potential, types, device=device, dtype=dtype)
    lmp.command("timestep 0.001")
    lmp.command("fix nve all nve")
    lmp.command("thermo 1000")
    lmp.command(f"run {warmup}")
    seconds = per_step(lambda n: lmp.command(f"run {n} pre no post no"), steps)
    lmp.close()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model file (default: an untrained EGNN, default training config)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    tune_allocator()  # as every engine below does on its own; the model-only columns come first
    if args.model:
        from potentials.export import load

        potential = load(args.model, device=args.device, dtype=args.dtype)
    else:
        potential = default_potential()
    torch_dtype = getattr(torch, args.dtype)
    potential = potential.to(device=args.device, dtype=torch_dtype).eval()
    rows = []
    for name, atoms in structures().items():
        model, model_graph = time_model(potential, atoms, args.steps, args.device, torch_dtype)
        ase_step = time_ase(potential, atoms, args.steps, args.warmup, args.device, args.dtype)
        lammps_step = time_lammps(potential, atoms, args.steps, args.warmup, args.device, args.dtype)
        rows.append((name, model, model_graph, ase_step, lammps_step))
        print(f"{name}: model {model * 1e3:.2f} ms, model + graph {model_graph * 1e3:.2f} ms, "
              f"ASE {ase_step * 1e3:.2f} ms, LAMMPS {lammps_step * 1e3:.2f} ms per step", flush=True)
    lines = [f"# Time per MD step ({time.strftime('%Y-%m-%d')}, {args.device}, {args.dtype}, "
             f"torch threads {torch.get_num_threads()}, {args.steps} steps)", "",
             "| structure | model (ms) | model + graph (ms) | ASE `potentials md` (ms) | LAMMPS (ms) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {m * 1e3:.2f} | {g * 1e3:.2f} | {a * 1e3:.2f} | {lm * 1e3:.2f} |"
              for n, m, g, a, lm in rows]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
