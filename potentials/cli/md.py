"""``potentials md MODEL STRUCTURE [STRUCTURE ...]``: molecular dynamics with a trained model.

Starts from Maxwell–Boltzmann velocities at --temperature (zero total momentum) and integrates with velocity
Verlet (NVE), a Langevin, Bussi or Nosé–Hoover-chain thermostat (NVT) or an MTK or Berendsen barostat (NPT,
periodic cells only). Writes to --out: md.traj (every --interval steps), md.log (ase MDLogger), md_energies.npz
(every step), md_energies.png and md_summary.json (for NVE, the total-energy drift per atom per ps from a
linear fit of E_tot/N against time).

Several structures (several files, folders, or every frame of a file with --batch-size) each get these files in
--out/<name>/, structure k (in the order listed) with seed --seed + k, and --out/summary.json lists them all.
With --batch-size N and/or --max-atoms M they are integrated together, up to N structures and M atoms per model
call (NVE and NVT; NPT runs one structure at a time), along the same trajectories as one by one. A structure
that cannot run (an element the model never saw, overlapping atoms) is reported and the others run; the exit code
is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from potentials.cli.options import (
    add_model_argument,
    add_runtime_options,
    collect_structures_or_exit,
    read_one_structure,
)
from potentials.errors import PotentialsInputError
from potentials.md import BAROSTATS, ENSEMBLES, THERMOSTATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("md", help="molecular dynamics (NVE, NVT, NPT) with a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("structures", nargs="+", metavar="structure",
                   help="starting structure (any file ASE or pymatgen reads; see --index); several files or folders "
                        "run each structure in --out/<name>/")
    p.add_argument("--index", default=None,
                   help="frame of a multi-frame file (default -1: the last; one structure file only)")
    p.add_argument("--ensemble", default="nve", type=str.lower, choices=ENSEMBLES, help="default nve")
    p.add_argument("--temperature", type=float, default=300.0,
                   help="K: initial Maxwell-Boltzmann temperature and thermostat target (default 300)")
    p.add_argument("--timestep", type=float, default=1.0, help="fs (default 1)")
    p.add_argument("--steps", type=int, default=1000, help="number of steps (default 1000)")
    p.add_argument("--thermostat", default="langevin", type=str.lower, choices=THERMOSTATS,
                   help="NVT thermostat (default langevin)")
    p.add_argument("--barostat", default="mtk", type=str.lower, choices=BAROSTATS,
                   help="NPT: mtk (isotropic MTK + Nosé-Hoover chains, default), mtk-full (all cell degrees of "
                        "freedom) or berendsen (isotropic)")
    p.add_argument("--pressure", type=float, default=0.0, help="NPT target pressure, GPa (default 0)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default 0.01)")
    p.add_argument("--tdamp", type=float, default=100.0, help="thermostat time constant, fs (default 100)")
    p.add_argument("--pdamp", type=float, default=1000.0, help="barostat time constant, fs (default 1000)")
    p.add_argument("--compressibility", type=float, default=0.01,
                   help="Berendsen barostat compressibility, 1/GPa (default 0.01)")
    p.add_argument("--interval", type=int, default=10, help="steps between trajectory frames and log lines")
    p.add_argument("--out", default="md", help="output folder (default ./md)")
    p.add_argument("--seed", type=int, default=0, help="seed of the velocities and stochastic thermostats")
    p.add_argument("--max-uncertainty", type=float, default=None, metavar="X",
                   help="eV/Å: flag steps whose maximum per-atom force std is above X in md_uncertainty.log and in "
                        "the trajectory (atoms.info['uncertain']); needs a model with uncertainty")
    p.add_argument("--stop-on-uncertainty", action="store_true",
                   help="stop at the first step above --max-uncertainty (that frame is written)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="integrate up to N structures per model call (NVE, NVT; not NPT); every frame of each file "
                        "runs")
    p.add_argument("--max-atoms", type=int, default=None, metavar="M",
                   help="at most M atoms per model call when batching (a larger structure runs alone)")
    add_runtime_options(p, "float64", "energy conservation")
    p.set_defaults(func=main)


def _dynamics_options(args: argparse.Namespace) -> dict:
    if args.ensemble == "nvt":
        return {"thermostat": args.thermostat, "friction_per_fs": args.friction, "tdamp_fs": args.tdamp}
    if args.ensemble == "npt":
        return {"barostat": args.barostat, "pressure_GPa": args.pressure, "tdamp_fs": args.tdamp,
                "pdamp_fs": args.pdamp, "compressibility_per_GPa": args.compressibility}
    return {}


def main(args: argparse.Namespace) -> int:
    batched = args.batch_size is not None or args.max_atoms is not None
    if batched or len(args.structures) > 1:
        return main_many(args, batched)
    from potentials.calculator import PotentialCalculator
    from potentials.md import run_md, write_outputs

    structure = args.structures[0]
    atoms = read_one_structure(structure, args.index if args.index is not None else "-1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calc = PotentialCalculator.from_file(args.model, device=args.device, dtype=args.dtype,
                                           kernels=args.kernels, compile=args.compile)
    settings = {"model": str(args.model), "structure": str(structure), "formula": atoms.get_chemical_formula(),
                "ensemble": args.ensemble, "temperature_K": args.temperature, "timestep_fs": args.timestep,
                "seed": args.seed, "dtype": args.dtype}
    options = _dynamics_options(args)
    settings.update(options)
    try:
        result = run_md(atoms, calc, ensemble=args.ensemble, temperature_K=args.temperature,
                        timestep_fs=args.timestep, steps=args.steps, seed=args.seed, trajectory=out / "md.traj",
                        logfile=out / "md.log", interval=args.interval, progress=not args.no_progress,
                        max_uncertainty=args.max_uncertainty, stop_on_uncertainty=args.stop_on_uncertainty,
                        uncertainty_log=out / "md_uncertainty.log", **options)
    except (ValueError, PotentialsInputError) as err:
        raise SystemExit(f"error: {structure}: {err}") from None
    files = write_outputs(result, out, settings)
    summary = json.loads(files["summary"].read_text())
    print(format_summary(summary), file=sys.stdout)
    print(f"\nwritten to {out}/: md.traj, md.log, " + ", ".join(p.name for p in files.values()))
    return 0


def main_many(args: argparse.Namespace, batched: bool) -> int:
    """Several structures, each in ``--out/<name>/``: together with ``--batch-size``/``--max-atoms``, else one by
    one through ASE."""
    from tqdm import tqdm

    from potentials.calculator import PotentialCalculator
    from potentials.md import run_md, write_outputs
    from potentials.relax import check_structure

    if args.index is not None:
        raise SystemExit("error: --index picks a frame of one structure file; with several files or --batch-size "
                         "every frame runs")
    if batched:
        if (args.batch_size is not None and args.batch_size < 1) or (args.max_atoms is not None
                                                                      and args.max_atoms < 1):
            raise SystemExit("error: --batch-size and --max-atoms must be positive")
        if args.ensemble == "npt":
            raise SystemExit("error: --batch-size integrates NVE and NVT; NPT changes each cell and runs one "
                             "structure at a time: drop --batch-size/--max-atoms")
    found = collect_structures_or_exit(args.structures)
    calc = PotentialCalculator.from_file(args.model, device=args.device, dtype=args.dtype,
                                           kernels=args.kernels, compile=args.compile)
    if args.max_uncertainty is not None or args.stop_on_uncertainty:
        from potentials.uncertainty import UncertaintyWatch

        try:  # refused once for all structures
            UncertaintyWatch(None, calc, threshold=args.max_uncertainty, stop=args.stop_on_uncertainty)
        except PotentialsInputError as err:
            raise SystemExit(f"error: {err}") from None
    out = Path(args.out)
    names, structures = list(found.names), list(found.structures)
    folders = [out / name for name in names]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + k for k in range(len(names))]
    options = _dynamics_options(args)
    rows: list[dict | None] = [None] * len(names)
    bar = tqdm(total=len(names) * args.steps, unit="step", desc=f"MD {args.ensemble} of {len(names)} structures",
               disable=args.no_progress, file=sys.stderr, mininterval=0.5)

    def done(i: int, result) -> None:
        name, atoms = names[i], structures[i]
        if isinstance(result, ValueError):
            bar.write(f"error: structure {name}: {result}", file=sys.stderr)
            rows[i] = {"structure": name, "atoms": len(atoms), "error": str(result)}
            bar.update(args.steps)
        else:
            settings = {"model": str(args.model), "structure": name, "formula": atoms.get_chemical_formula(),
                        "ensemble": args.ensemble, "temperature_K": args.temperature, "timestep_fs": args.timestep,
                        "seed": seeds[i], "dtype": args.dtype, **options}
            if batched:
                settings.update(batch_size=args.batch_size, max_atoms=args.max_atoms)
            files = write_outputs(result, folders[i], settings)
            rows[i] = {"structure": name, "output": str(folders[i]), **json.loads(files["summary"].read_text())}
            bar.update(args.steps if not batched else args.steps - rows[i]["steps"])  # batched: steps counted

    if batched:
        from potentials.batch_md import md_many

        md_many(structures, calc.potential, ensemble=args.ensemble, temperature_K=args.temperature,
                timestep_fs=args.timestep, steps=args.steps, seeds=seeds,
                batch_size=args.batch_size or len(structures), max_atoms=args.max_atoms,
                trajectories=[f / "md.traj" for f in folders], logfiles=[f / "md.log" for f in folders],
                uncertainty_logs=[f / "md_uncertainty.log" for f in folders], interval=args.interval,
                max_uncertainty=args.max_uncertainty, stop_on_uncertainty=args.stop_on_uncertainty,
                on_done=done, on_step=bar.update, **options)
    else:
        for i, (name, atoms) in enumerate(zip(names, structures, strict=True)):
            bar.set_postfix_str(name[:30])
            try:
                check_structure(atoms, calc.potential)
                result = run_md(atoms, calc, ensemble=args.ensemble, temperature_K=args.temperature,
                                timestep_fs=args.timestep, steps=args.steps, seed=seeds[i],
                                trajectory=folders[i] / "md.traj", logfile=folders[i] / "md.log",
                                interval=args.interval, max_uncertainty=args.max_uncertainty,
                                stop_on_uncertainty=args.stop_on_uncertainty,
                                uncertainty_log=folders[i] / "md_uncertainty.log", **options)
            except ValueError as err:  # bad input: reported, the other structures go on
                result = err
            done(i, result)
    bar.close()
    print(format_table(rows))
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    n_bad = sum("error" in r for r in rows)
    rejected = f", {n_bad} rejected (see errors above)" if n_bad else ""
    skipped = f", {len(found.skipped)} unreadable files skipped" if found.skipped else ""
    how = "one by one"
    if batched:
        how = f"batched, up to {args.batch_size or len(rows)} structures" + (
            f" and {args.max_atoms} atoms" if args.max_atoms else "") + " per model call"
    print(f"\n{len(rows) - n_bad}/{len(rows)} structures ran ({how}){rejected}{skipped}; "
          f"md.traj, md.log, md_energies.npz/.png and md_summary.json in {out}/<name>/, summary.json in {out}/")
    return 1 if n_bad else 0


def format_table(rows: list[dict]) -> str:
    """One line per structure: atoms, steps run, mean temperature and E_pot/N over the second half, E_tot drift."""
    header = (f"{'structure':<28} {'atoms':>5} {'steps':>6} {'T (K)':>8} {'E_pot/N (eV)':>13} "
              f"{'drift (meV/atom/ps)':>20}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['structure'][:28]:<28} {r['atoms']:>5} {'ERROR':>6}  {r['error'][:60]}")
            continue
        drift = r.get("etot_drift_meV_per_atom_per_ps")
        stopped = (r.get("uncertainty") or {}).get("stopped_at_step")
        lines.append(f"{r['structure'][:28]:<28} {r['n_atoms']:>5} {r['steps']:>6} {r['temperature_mean_K']:>8.1f} "
                     f"{r['epot_mean_eV_per_atom']:>13.5f} " + (f"{drift:>+20.4g}" if drift is not None else
                                                                 f"{'-':>20}")
                     + (f"  stopped on uncertainty at step {stopped}" if stopped is not None else ""))
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    """The printed summary of ``md_summary.json``."""
    lines = [f"{s['ensemble'].upper()} MD of {s['formula']} ({s['n_atoms']} atoms): {s['steps']} steps of "
             f"{s['timestep_fs']} fs = {s['simulated_time_ps']:.3f} ps in {s['wall_time_s']:.1f} s "
             f"({s['ns_per_day'] or float('nan'):.3g} ns/day)",
             f"  temperature (second half)  {s['temperature_mean_K']:.1f} ± {s['temperature_std_K']:.1f} K",
             f"  E_pot/N (second half)      {s['epot_mean_eV_per_atom']:.5f} eV/atom"]
    if "etot_drift_meV_per_atom_per_ps" in s:
        lines.append(f"  E_tot drift                {s['etot_drift_meV_per_atom_per_ps']:+.4g} meV/atom/ps "
                     f"(fluctuation {s['etot_std_meV_per_atom']:.3g} meV/atom, max deviation "
                     f"{s['etot_max_deviation_meV_per_atom']:.3g} meV/atom)")
    u = s.get("uncertainty")
    if u:
        lines.append(f"  max force std              {u['max_force_std_eV_per_A']:.4g} eV/Å (mean of the per-step "
                     f"maxima {u['mean_max_force_std_eV_per_A']:.4g}); {u['n_uncertain_steps']} steps above "
                     f"{u['max_uncertainty']}" + (f"; stopped at step {u['stopped_at_step']}"
                                                   if u.get("stopped_at_step") is not None else ""))
    if "volume_mean_A3" in s and s["ensemble"] == "npt":
        lines.append(f"  volume (second half)       {s['volume_mean_A3']:.2f} Å³ "
                     f"({s['volume_change_percent']:+.2f}% at the end)")
    return "\n".join(lines)
