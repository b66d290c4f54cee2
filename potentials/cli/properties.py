"""``potentials hessian|phonons|elastic|eos MODEL STRUCTURE``: material properties of a trained model.

Each command writes a JSON record beside its PNG figures in ``--out``; see docs/properties.md for the conventions
(units, Voigt order, stress sign). The library functions behind them (:mod:`potentials.properties`) take any ASE
calculator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from potentials.cli.options import add_model_argument, add_runtime_options, read_one_structure

PHONONS = """Phonons with phonopy: force constants of a supercell (the autograd Hessian of the model, or finite
displacements), the band structure along the standard path of the primitive cell's Bravais lattice, the DOS and
the harmonic free energy, entropy and heat capacity. Writes phonons.json (frequencies in THz at every point of the
path and at its special points, count of imaginary modes, DOS, thermal properties), phonons.png and thermal.png."""

ELASTIC = """Elastic constants: the cell is first relaxed to zero stress (positions and lattice, recorded), then
C_ij = dσ_i/dε_j from symmetric ± strains of each Voigt component (xx, yy, zz, yz, xz, xy; engineering shear
strains), the atoms relaxed at every strain. Writes elastic.json (C_GPa, Voigt/Reuss/Hill bulk and shear moduli,
Born stability) and elastic.png."""

HESSIAN = """The Hessian d²E/dr_i dr_j of the structure (eV/Å², cell fixed) by a second autograd pass through
the model, and the harmonic frequencies of its mass-weighted form (cm⁻¹; imaginary modes as negative numbers).
Writes hessian.npy ([3N, 3N], row 3i+a: atom i, direction a) and hessian.json (frequencies, count of imaginary
modes below -10 cm⁻¹, largest asymmetry |H - Hᵀ|)."""

EOS = """Equation of state: E(V) at volumes around the relaxed one, the cell scaled isotropically for cubic
crystals or its shape relaxed at fixed volume otherwise (the positions relaxed in both), fitted with the
third-order Birch-Murnaghan form. Writes eos.json (V0 in Å³ per cell, E0 in eV, B0_GPa, B0_prime, the samples)
and eos.png."""


def _common(p: argparse.ArgumentParser, out: str) -> None:
    add_model_argument(p)
    p.add_argument("structure", help="the structure (any file ASE or pymatgen reads; see --index)")
    p.add_argument("--index", default="-1", help="frame of a multi-frame file (default -1: the last)")
    p.add_argument("--out", default=out, help=f"output folder (default ./{out})")
    add_runtime_options(p, "float64", "second derivatives and small energy differences")


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("hessian", help="Hessian and harmonic frequencies of a structure (molecule or crystal)",
                       description=HESSIAN, formatter_class=fmt)
    _common(p, "hessian")
    p.set_defaults(func=hessian_main)

    p = sub.add_parser("phonons", help="phonon bands, DOS and thermal properties (phonopy)", description=PHONONS,
                       formatter_class=fmt)
    _common(p, "phonons")
    p.add_argument("--supercell", type=int, nargs=3, default=[3, 3, 3], metavar=("NA", "NB", "NC"),
                   help="repetitions of the input cell for the force constants (default 3 3 3)")
    p.add_argument("--method", default="auto", choices=["auto", "hessian", "displacements"],
                   help="force constants from the autograd Hessian, from phonopy's finite displacements, or "
                        "(auto, default) whichever needs fewer model evaluations")
    p.add_argument("--displacement", type=float, default=0.01, help="finite displacement, Å (default 0.01)")
    p.add_argument("--mesh", type=float, nargs="+", default=[30.0],
                   help="q-point mesh of the DOS and thermal properties: three integers, or one length (phonopy's "
                        "meaning; default 30)")
    p.add_argument("--tmax", type=float, default=1000.0, help="highest temperature, K (default 1000)")
    p.add_argument("--tstep", type=float, default=10.0, help="temperature step, K (default 10)")
    p.add_argument("--relax", action="store_true", help="relax positions and cell to zero stress first")
    p.set_defaults(func=phonons_main)

    p = sub.add_parser("elastic", help="elastic constants Cij, bulk and shear moduli, Born stability",
                       description=ELASTIC, formatter_class=fmt)
    _common(p, "elastic")
    p.add_argument("--strain", type=float, default=0.005, help="size of the ± strains (default 0.005)")
    p.add_argument("--no-relax", action="store_true", help="use the cell as given (no zero-stress relaxation)")
    p.add_argument("--standardize", action="store_true",
                   help="use the standard conventional cell (spglib), so that C is in the crystal's conventional axes; "
                        "otherwise C is in the Cartesian frame of the file (a CIF puts a along x)")
    p.add_argument("--clamped-ions", action="store_true", help="no relaxation of the atoms at each strain")
    p.add_argument("--fmax", type=float, default=1e-4, help="force threshold of the relaxations, eV/Å (1e-4)")
    p.set_defaults(func=elastic_main)

    p = sub.add_parser("eos", help="equation of state E(V) and its Birch-Murnaghan fit", description=EOS,
                       formatter_class=fmt)
    _common(p, "eos")
    p.add_argument("--range", type=float, default=0.05, dest="volume_range",
                   help="volumes from V0(1-range) to V0(1+range) (default 0.05)")
    p.add_argument("--points", type=int, default=11, help="number of volumes (default 11)")
    p.add_argument("--mode", default="auto", choices=["auto", "isotropic", "relaxed"],
                   help="isotropic scaling or shape relaxation at each volume (auto: isotropic for cubic crystals)")
    p.add_argument("--no-relax", action="store_true", help="center the volumes on the cell as given")
    p.set_defaults(func=eos_main)


def _load(args: argparse.Namespace):
    from potentials.calculator import PotentialCalculator

    atoms = read_one_structure(args.structure, args.index)
    calc = PotentialCalculator.from_file(args.model, device=args.device, dtype=args.dtype, kernels=args.kernels,
                                           compile=args.compile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(args.model), "structure": str(args.structure), "dtype": args.dtype}
    return atoms, calc, out, settings


def _write(out: Path, name: str, record: dict) -> Path:
    path = out / name
    path.write_text(json.dumps(record, indent=2))
    return path


def phonons_main(args: argparse.Namespace) -> int:
    from potentials.plots import save
    from potentials.properties.phonons import phonons, plot_bands, plot_thermal
    from potentials.relax import relax

    atoms, calc, out, settings = _load(args)
    if len(args.mesh) not in (1, 3):
        raise SystemExit("error: --mesh takes one length or three integers")
    mesh = args.mesh[0] if len(args.mesh) == 1 else tuple(int(m) for m in args.mesh)
    try:
        if args.relax:
            atoms = relax(atoms, calc, fmax=1e-4, steps=1000, optimizer="BFGS", cell=True).atoms
        result = phonons(atoms, calc, args.supercell, method=args.method, displacement=args.displacement,
                         mesh=mesh, t_max=args.tmax, t_step=args.tstep)
    except ValueError as err:
        raise SystemExit(f"error: {args.structure}: {err}") from None
    record = {**settings, "formula": atoms.get_chemical_formula(), "relaxed": args.relax, **result.summary()}
    path = _write(out, "phonons.json", record)
    title = f"{atoms.get_chemical_formula()} ({result.method})"
    save(plot_bands(result, title), out / "phonons.png")
    save(plot_thermal(result, title), out / "thermal.png")
    print(f"phonons of {atoms.get_chemical_formula()}: {len(result.phonopy.supercell)}-atom supercell, force "
          f"constants by {result.method} ({result.n_evaluations} "
          f"{'displaced supercells' if result.method == 'displacements' else 'Hessian rows'})")
    for point in result.special_points:
        freqs = " ".join(f"{f:.3f}" for f in point["frequencies_THz"][:6])
        print(f"  {point['label']:<3} {freqs}{' ...' if len(point['frequencies_THz']) > 6 else ''} THz")
    print(f"  imaginary modes on the path: {result.imaginary_modes} (below -{record['imaginary_tolerance_THz']} THz)")
    print(f"\nwritten to {out}/: {path.name}, phonons.png, thermal.png")
    return 0


def elastic_main(args: argparse.Namespace) -> int:
    from potentials.plots import save
    from potentials.properties.elastic import elastic_constants, plot_elastic

    atoms, calc, out, settings = _load(args)
    try:
        result = elastic_constants(atoms, calc, strain=args.strain, relax_cell=not args.no_relax,
                                   relax_atoms=not args.clamped_ions, fmax=args.fmax,
                                   standardize=args.standardize)
    except ValueError as err:
        raise SystemExit(f"error: {args.structure}: {err}") from None
    record = {**settings, **result.summary()}
    path = _write(out, "elastic.json", record)
    save(plot_elastic(result), out / "elastic.png")
    print(f"elastic constants of {record['formula']} (GPa; Voigt order xx yy zz yz xz xy):")
    for row in result.c:
        print("  " + " ".join(f"{x:9.2f}" for x in row))
    for name in ("bulk_modulus_GPa", "shear_modulus_GPa"):
        m = record[name]
        print(f"  {name.split('_')[0]:<5} modulus  Voigt {m['voigt']:.2f}  Reuss {m['reuss']:.2f}  "
              f"Hill {m['hill']:.2f} GPa")
    print(f"  Born stable: {'yes' if result.stable else 'NO'} (smallest eigenvalue {result.eigenvalues.min():.2f} GPa)")
    print(f"\nwritten to {out}/: {path.name}, elastic.png")
    return 0


def eos_main(args: argparse.Namespace) -> int:
    from potentials.plots import save
    from potentials.properties.eos import equation_of_state, plot_eos

    atoms, calc, out, settings = _load(args)
    try:
        result = equation_of_state(atoms, calc, volume_range=args.volume_range, points=args.points,
                                   relax_first=not args.no_relax, mode=args.mode)
    except ValueError as err:
        raise SystemExit(f"error: {args.structure}: {err}") from None
    record = {**settings, **result.summary()}
    path = _write(out, "eos.json", record)
    save(plot_eos(result.volumes, result.energies, result.fit, f"{record['formula']} ({result.mode})"),
         out / "eos.png")
    f = result.fit
    print(f"Birch-Murnaghan fit for {record['formula']} ({result.mode} cells, {len(result.volumes)} volumes): "
          f"V0 {f['V0']:.4f} Å³, E0 {f['E0']:.5f} eV, B0 {f['B0_GPa']:.2f} GPa, B0' {f['B0_prime']:.3f}")
    print(f"\nwritten to {out}/: {path.name}, eos.png")
    return 0


def hessian_main(args: argparse.Namespace) -> int:
    import numpy as np

    from potentials.properties.hessian import harmonic_frequencies, hessian

    atoms, calc, out, settings = _load(args)
    try:
        hess = hessian(atoms, calc)
    except ValueError as err:
        raise SystemExit(f"error: {args.structure}: {err}") from None
    frequencies = harmonic_frequencies(hess, atoms.get_masses())
    np.save(out / "hessian.npy", hess)
    record = {**settings, "formula": atoms.get_chemical_formula(), "n_atoms": len(atoms),
              "units": {"hessian": "eV/Å²", "frequencies": "cm^-1"},
              "frequencies_cm-1": frequencies.tolist(), "imaginary_modes": int((frequencies < -10.0).sum()),
              "max_asymmetry_eV_per_A2": float(np.abs(hess - hess.T).max())}
    path = _write(out, "hessian.json", record)
    shown = " ".join(f"{f:.1f}" for f in frequencies[-6:])
    print(f"Hessian of {record['formula']} ({3 * len(atoms)} x {3 * len(atoms)}, eV/Å²); highest frequencies "
          f"{shown} cm⁻¹; imaginary modes: {record['imaginary_modes']}")
    print(f"\nwritten to {out}/: {path.name}, hessian.npy")
    return 0
