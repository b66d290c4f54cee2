"""``potentials md MODEL STRUCTURE``: molecular dynamics with a trained model through ASE.

Starts from Maxwell–Boltzmann velocities at --temperature (zero total momentum) and integrates with velocity
Verlet (NVE), a Langevin, Bussi or Nosé–Hoover-chain thermostat (NVT) or an MTK or Berendsen barostat (NPT,
periodic cells only). Writes to --out: md.traj (every --interval steps), md.log (ase MDLogger), md_energies.npz
(every step), md_energies.png and md_summary.json (for NVE, the total-energy drift per atom per ps from a
linear fit of E_tot/N against time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from potentials.cli.options import add_model_argument, add_runtime_options, read_one_structure
from potentials.errors import PotentialsInputError
from potentials.md import BAROSTATS, ENSEMBLES, THERMOSTATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("md", help="molecular dynamics (NVE, NVT, NPT) with a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("structure", help="starting structure (any file ASE or pymatgen reads; see --index)")
    p.add_argument("--index", default="-1", help="frame of a multi-frame file (default -1: the last)")
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
    add_runtime_options(p, "float64", "energy conservation")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from potentials.calculator import PotentialCalculator
    from potentials.md import run_md, write_outputs

    atoms = read_one_structure(args.structure, args.index)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calc = PotentialCalculator.from_file(args.model, device=args.device, dtype=args.dtype,
                                           kernels=args.kernels,
                                           compile=args.compile)
    settings = {"model": str(args.model), "structure": str(args.structure), "formula": atoms.get_chemical_formula(),
                "ensemble": args.ensemble, "temperature_K": args.temperature, "timestep_fs": args.timestep,
                "seed": args.seed, "dtype": args.dtype}
    options = {}
    if args.ensemble == "nvt":
        options = {"thermostat": args.thermostat, "friction_per_fs": args.friction, "tdamp_fs": args.tdamp}
    elif args.ensemble == "npt":
        options = {"barostat": args.barostat, "pressure_GPa": args.pressure, "tdamp_fs": args.tdamp,
                   "pdamp_fs": args.pdamp, "compressibility_per_GPa": args.compressibility}
    settings.update(options)
    try:
        result = run_md(atoms, calc, ensemble=args.ensemble, temperature_K=args.temperature,
                        timestep_fs=args.timestep, steps=args.steps, seed=args.seed, trajectory=out / "md.traj",
                        logfile=out / "md.log", interval=args.interval, progress=not args.no_progress,
                        max_uncertainty=args.max_uncertainty, stop_on_uncertainty=args.stop_on_uncertainty,
                        uncertainty_log=out / "md_uncertainty.log", **options)
    except (ValueError, PotentialsInputError) as err:
        raise SystemExit(f"error: {args.structure}: {err}") from None
    files = write_outputs(result, out, settings)
    summary = json.loads(files["summary"].read_text())
    print(format_summary(summary), file=sys.stdout)
    print(f"\nwritten to {out}/: md.traj, md.log, " + ", ".join(p.name for p in files.values()))
    return 0


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
