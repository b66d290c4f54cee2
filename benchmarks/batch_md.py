"""Batched against one-by-one MD: structure-steps per second of ``md_many`` and of ASE's velocity Verlet in a loop.

Two sets of rattled and strained Cu fcc cells (the structures of :mod:`benchmarks.batch_relax`), integrated in NVE
from 300 K with 1 fs steps: 64 structures of 2 to 64 atoms (100 steps each) and 4 of 500 atoms (20 steps each).
Both paths run the same structures with the same seeds and model in float64 in one process, one after the other;
the report also checks that they agree (largest difference of final positions, in Å). The model is the small EGNN
fitted to EMT Cu of :mod:`benchmarks.batch_relax`, or ``--model PATH`` (a model.pt that knows Cu).

    python -m benchmarks.batch_md            # writes benchmarks/results/batch_md.md and batch_md.json
    python -m benchmarks.batch_md --quick    # 16 small structures for 20 steps, 2 large for 5
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

from benchmarks.batch_relax import benchmark_model, large_structures, small_structures

RESULTS = Path(__file__).resolve().parent / "results"


def measure(structures: list[ase.Atoms], calc, *, steps: int, batch_size: int, max_atoms: int | None) -> dict:
    """NVE from 300 K, one by one (``run_md``, ASE) and batched (``md_many``); times, throughput and agreement."""
    from potentials.batch_md import md_many
    from potentials.md import run_md

    seeds = list(range(len(structures)))
    print(f"{len(structures)} structures x {steps} steps: one by one ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    one = [run_md(a, calc, ensemble="nve", temperature_K=300.0, timestep_fs=1.0, steps=steps, seed=s)
           for a, s in zip(structures, seeds, strict=True)]
    t_one = time.perf_counter() - t0
    print(f"  {t_one:.1f} s; batched ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    many = md_many(structures, calc.potential, ensemble="nve", temperature_K=300.0, timestep_fs=1.0, steps=steps,
                   seeds=seeds, batch_size=batch_size, max_atoms=max_atoms)
    t_many = time.perf_counter() - t0
    print(f"  {t_many:.1f} s", file=sys.stderr, flush=True)
    sizes = [len(a) for a in structures]
    work = len(structures) * steps
    return {
        "structures": len(structures), "atoms_min": min(sizes), "atoms_max": max(sizes), "atoms_total": sum(sizes),
        "steps": steps, "batch_size": batch_size, "max_atoms": max_atoms,
        "one_by_one_s": t_one, "batched_s": t_many,
        "one_by_one_structure_steps_per_s": work / t_one, "batched_structure_steps_per_s": work / t_many,
        "one_by_one_atom_steps_per_s": sum(sizes) * steps / t_one,
        "batched_atom_steps_per_s": sum(sizes) * steps / t_many,
        "speedup": t_one / t_many,
        "max_position_diff_A": max(float(np.abs(a.atoms.positions - b.atoms.positions).max())
                                   for a, b in zip(one, many, strict=True)),
        "max_abs_drift_batched_meV_per_atom_per_ps": max(abs(r.drift()) for r in many),
    }


def write_report(info: dict, rows: dict[str, dict]) -> str:
    lines = [
        "# Batched MD against one by one", "",
        f"Run {info['date']} on {info['machine']}; torch {info['torch']}, {info['threads']} torch thread(s), "
        f"float64, {info['device']}. Load average before / after: {info['load_before']} / {info['load_after']} "
        f"(the machine was shared with other work). Model: {info['model']}.", "",
        "NVE from 300 K, 1 fs steps. One by one: `potentials.md.run_md` (ASE velocity Verlet, one model call per "
        "structure per step). Batched: `potentials.batch_md.md_many` (the same update per structure, one model call "
        "per step for the batch). Same structures, seeds, model and process.", "",
        "| set | structures | atoms | steps | batch | one by one (structure-steps/s) | batched (structure-steps/s) | "
        "speed-up | one by one (atom-steps/s) | batched (atom-steps/s) | max Δ position (Å) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        batch = f"{r['batch_size']}" + (f", ≤{r['max_atoms']} atoms" if r["max_atoms"] else "")
        lines.append(
            f"| {name} | {r['structures']} | {r['atoms_min']}–{r['atoms_max']} | {r['steps']} | {batch} | "
            f"{r['one_by_one_structure_steps_per_s']:.1f} | {r['batched_structure_steps_per_s']:.1f} | "
            f"{r['speedup']:.1f}× | {r['one_by_one_atom_steps_per_s']:.0f} | {r['batched_atom_steps_per_s']:.0f} | "
            f"{r['max_position_diff_A']:.1e} |")
    lines += ["", "Largest |E_tot drift| of a batched run: "
              f"{max(r['max_abs_drift_batched_meV_per_atom_per_ps'] for r in rows.values()):.3g} meV/atom/ps."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model.pt that knows Cu (default: fit a small EGNN to EMT Cu)")
    parser.add_argument("--quick", action="store_true", help="16 small structures for 20 steps, 2 large for 5")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", default=str(RESULTS / "batch_md"), help="report path without extension")
    args = parser.parse_args(argv)
    from potentials.calculator import PotentialCalculator

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    model_path, model_name = benchmark_model(args.model)
    calc = PotentialCalculator.from_file(model_path, dtype="float64", device=args.device)
    (n_small, s_small), (n_large, s_large) = ((16, 20), (2, 5)) if args.quick else ((64, 100), (4, 20))
    rows = {
        "2–64 atoms": measure(small_structures(n_small), calc, steps=s_small, batch_size=64, max_atoms=None),
        "500 atoms": measure(large_structures(n_large), calc, steps=s_large, batch_size=4, max_atoms=2000),
    }
    device = "CPU"
    if args.device != "cpu":
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else args.device
    info = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPU cores", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": device, "load_before": load_before,
            "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()), "model": model_name,
            "command": "python -m benchmarks.batch_md " + " ".join(argv if argv is not None else sys.argv[1:])}
    report = write_report(info, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "sets": rows}, indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
