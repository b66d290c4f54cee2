"""``potentials lammps MODEL INPUT --types Cu Au``: run a LAMMPS input with a trained model as its force field.

The input is an ordinary LAMMPS input in ``units metal`` with no pair_style or pair_coeff lines. As soon as a
command has created the box (read_data, create_box, read_restart), the model is attached: ``pair_style zero``
at the model's cutoff, a mass for each type that has none yet, and ``fix potentials all external`` with
``fix_modify potentials energy yes virial yes``, so that thermo output, dumps, run, minimize and fix npt all see
its energy, forces and pressure. One MPI rank only. See docs/lammps.md.
"""

from __future__ import annotations

import argparse
import sys

from potentials.cli.options import add_model_argument, add_runtime_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lammps", help="run a LAMMPS input with a trained model as the force field",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("input", help="LAMMPS input file (units metal, no pair_style/pair_coeff)")
    p.add_argument("--types", nargs="+", required=True, metavar="ELEMENT",
                   help="element of each LAMMPS atom type, in type order (e.g. --types Cu Au)")
    p.add_argument("--var", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="define an index-style LAMMPS variable, like lmp -var (repeatable)")
    p.add_argument("--log", default="log.lammps", help="LAMMPS log file, or none (default log.lammps)")
    p.add_argument("--screen", default=None, help="LAMMPS screen output file, or none (default: the terminal)")
    add_runtime_options(p, "float64", "energy conservation")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from potentials.errors import PotentialsInputError
    from potentials.export import load
    from potentials.lammps import attach, import_lammps, run_input

    try:
        lammps = import_lammps()
    except ImportError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        potential = load(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    except (FileNotFoundError, PotentialsInputError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.kernels is not None:
        potential.kernels = args.kernels
    cmdargs = ["-log", args.log]
    if args.screen is not None:
        cmdargs += ["-screen", args.screen]
    for name, value in args.var:
        cmdargs += ["-var", name, value]
    lmp = lammps.lammps(cmdargs=cmdargs)
    try:
        run_input(lmp, args.input, lambda lmp: attach(lmp, potential, args.types, device=args.device,
                                                      dtype=args.dtype, exit_on_error=True))
    except (FileNotFoundError, PotentialsInputError) as err:
        raise SystemExit(f"error: {err}") from None
    except Exception as err:  # LAMMPS's own errors arrive as plain exceptions holding its message
        print(f"error: LAMMPS: {err}", file=sys.stderr)
        return 1
    finally:
        lmp.close()
    return 0
