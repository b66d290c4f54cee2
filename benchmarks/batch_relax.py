"""Batched against one-by-one relaxation: structures per second of ``relax_many`` and of ASE's FIRE in a loop.

Two sets of rattled and strained Cu fcc cells, relaxed to fmax 0.05 eV/Å (positions; ``--cell`` adds the lattice):
200 structures of 2 to 64 atoms (mixed sizes) and 20 of 500 atoms. Both paths relax the same structures with the
same model in float64 in one process, one after the other; the report also checks that they agree (converged
flags, energies per atom, final fmax). The model is a small EGNN fitted to EMT Cu for a few seconds (as the tests'
models are), or ``--model PATH`` (a model.pt that knows Cu).

    python -m benchmarks.batch_relax            # writes benchmarks/results/relax.md and relax.json
    python -m benchmarks.batch_relax --quick    # 40 small and 4 large structures
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import ase
import numpy as np
import torch
from ase.build import bulk

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_CONFIG = {"_target_": "potentials.models.egnn.EGNN", "cutoff": 4.5, "avg_num_neighbors": 30.0,
                "channels": 16, "num_layers": 2, "num_basis": 6, "envelope_p": 6}


def fit_model(path: Path, steps: int = 120) -> Path:
    """A small EGNN fitted to EMT Cu frames (a sensible minimum near fcc Cu), exported as training does."""
    from torch_geometric.data import Batch

    from potentials.datasets import emt
    from potentials.export import save
    from potentials.graph import AtomicGraph
    from potentials.models.egnn import EGNN
    from potentials.potential import Potential
    from potentials.training.loss import PotentialLoss

    torch.manual_seed(0)
    frames = emt.generate(seed=5, n_structures=16, elements=("Cu",))
    batch = Batch.from_data_list([AtomicGraph.from_atoms(a, MODEL_CONFIG["cutoff"]) for a in frames])
    e_ref = float((batch.energy / batch.num_atoms).mean())
    model = EGNN(**{k: v for k, v in MODEL_CONFIG.items() if k != "_target_"})
    potential = Potential(model, MODEL_CONFIG["cutoff"], {29: e_ref}, scale=0.5)
    loss_fn = PotentialLoss(energy_weight=1.0, forces_weight=10.0, stress_weight=0.0)
    opt = torch.optim.Adam(potential.parameters(), lr=1e-2)
    potential.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(potential(batch, compute_stress=False), batch)["total"].backward()
        opt.step()
    return save(potential.eval(), path, MODEL_CONFIG)


def small_structures(n: int, seed: int = 0) -> list[ase.Atoms]:
    """``n`` Cu cells of 2 to 64 atoms: primitive and cubic fcc repeats, strained ±2 % and rattled 0.05 Å."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        cubic = bool(rng.integers(2))
        rep = rng.integers(1, 5, size=3)
        size = int(rep.prod()) * (4 if cubic else 1)
        if not 2 <= size <= 64:
            continue
        atoms = bulk("Cu", "fcc", a=3.6 * rng.uniform(0.98, 1.02), cubic=cubic).repeat(rep)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def large_structures(n: int, seed: int = 1) -> list[ase.Atoms]:
    """``n`` cubic Cu cells of 500 atoms (5×5×5), strained ±1 % and rattled 0.05 Å."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 * rng.uniform(0.99, 1.01), cubic=True).repeat(5)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def measure(structures: list[ase.Atoms], calc, *, batch_size: int, max_atoms: int | None, cell: bool,
            fmax: float) -> dict:
    """Relax ``structures`` one by one (ASE FIRE) and batched; times, throughput and agreement."""
    from potentials.batch_relax import relax_many
    from potentials.relax import relax

    print(f"{len(structures)} structures: one by one ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    one = [relax(a, calc, fmax=fmax, steps=500, cell=cell) for a in structures]
    t_one = time.perf_counter() - t0
    print(f"  {t_one:.1f} s; batched ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    many = relax_many(structures, calc.potential, fmax=fmax, steps=500, cell=cell, batch_size=batch_size,
                      max_atoms=max_atoms)
    t_many = time.perf_counter() - t0
    sizes = [len(a) for a in structures]
    de = [abs(a.final_energy - b.final_energy) / n for a, b, n in zip(one, many, sizes, strict=True)]
    return {
        "structures": len(structures), "atoms_min": min(sizes), "atoms_max": max(sizes), "atoms_total": sum(sizes),
        "batch_size": batch_size, "max_atoms": max_atoms, "cell": cell, "fmax": fmax,
        "one_by_one_s": t_one, "batched_s": t_many,
        "one_by_one_structures_per_s": len(structures) / t_one, "batched_structures_per_s": len(structures) / t_many,
        "speedup": t_one / t_many,
        "steps_one_by_one": sum(r.steps for r in one), "steps_batched": sum(r.steps for r in many),
        "converged_one_by_one": sum(r.converged for r in one), "converged_batched": sum(r.converged for r in many),
        "same_converged_flags": all(a.converged == b.converged for a, b in zip(one, many, strict=True)),
        "max_energy_diff_eV_per_atom": max(de),
        "max_final_fmax_batched": max(r.final_fmax for r in many),
    }


def write_report(info: dict, rows: dict[str, dict]) -> str:
    lines = [
        "# Batched relaxation against one by one", "",
        f"Run {info['date']} on {info['machine']}; torch {info['torch']}, {info['threads']} torch thread(s), "
        f"float64, CPU. Load average before / after: {info['load_before']} / {info['load_after']} "
        f"(the machine was shared with other work). Model: {info['model']}.", "",
        "One by one: `potentials.relax.relax` (ASE FIRE, one model call per structure per step). Batched: "
        "`potentials.batch_relax.relax_many` (the same FIRE per structure, one model call per step for the batch). "
        "Same structures, same model, same process.", "",
        "| set | structures | atoms | batch | one by one (structures/s) | batched (structures/s) | speed-up | "
        "steps (1-by-1 / batched) | converged (1-by-1 / batched) | max dE (meV/atom) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        batch = f"{r['batch_size']}" + (f", ≤{r['max_atoms']} atoms" if r["max_atoms"] else "")
        lines.append(
            f"| {name} | {r['structures']} | {r['atoms_min']}–{r['atoms_max']} | {batch} | "
            f"{r['one_by_one_structures_per_s']:.2f} | {r['batched_structures_per_s']:.2f} | {r['speedup']:.1f}× | "
            f"{r['steps_one_by_one']} / {r['steps_batched']} | {r['converged_one_by_one']} / "
            f"{r['converged_batched']} | {1000 * r['max_energy_diff_eV_per_atom']:.2g} |")
    lines += ["", "Same converged flags in every set: "
              f"{all(r['same_converged_flags'] for r in rows.values())}; largest final fmax of the batched path: "
              f"{max(r['max_final_fmax_batched'] for r in rows.values()):.4f} eV/Å (threshold "
              f"{next(iter(rows.values()))['fmax']})."]
    return "\n".join(lines) + "\n"


def benchmark_model(path: str | None) -> tuple[Path, str]:
    """The model file to measure and its description: ``path`` when given, else a small EGNN fitted to EMT Cu."""
    if path:
        return Path(path), f"`{path}`"
    import tempfile

    return fit_model(Path(tempfile.mkdtemp()) / "cu.pt"), (
        f"EGNN ({MODEL_CONFIG['channels']} channels, {MODEL_CONFIG['num_layers']} layers, "
        f"cutoff {MODEL_CONFIG['cutoff']} Å) fitted to EMT Cu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model.pt that knows Cu (default: fit a small EGNN to EMT Cu)")
    parser.add_argument("--quick", action="store_true", help="40 small and 4 large structures")
    parser.add_argument("--cell", action="store_true", help="relax the cell too")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(RESULTS / "relax"), help="report path without extension")
    args = parser.parse_args(argv)
    from potentials.calculator import PotentialCalculator

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    model_path, model_name = benchmark_model(args.model)
    calc = PotentialCalculator.from_file(model_path, dtype="float64")
    n_small, n_large = (40, 4) if args.quick else (200, 20)
    rows = {
        "small": measure(small_structures(n_small), calc, batch_size=64, max_atoms=None, cell=args.cell, fmax=0.05),
        "500 atoms": measure(large_structures(n_large), calc, batch_size=8, max_atoms=2000, cell=args.cell,
                             fmax=0.05),
    }
    info = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPU cores", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_before": load_before, "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "model": model_name}
    report = write_report(info, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "sets": rows}, indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
