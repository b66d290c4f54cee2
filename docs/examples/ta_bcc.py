"""bcc tantalum: a trained model's lattice constant, EOS, elastic constants and phonons next to DFT's.

The DFT reference comes from the training data itself (FitSNAP's Ta set, Thompson et al., J. Comp. Phys. 285,
316 (2015)): the ``Volume_BCC`` frames give E(V), fitted with the same Birch-Murnaghan form as the model's; the
``Elastic_BCC`` frames (small random strains of the 2-atom cubic cell) give stress against strain, and a least-
squares fit σ = σ0 + C ε over all of them gives C. Usage::

    python docs/examples/ta_bcc.py MODEL DATA.extxyz --out ta_properties
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ase.build
import ase.io
import numpy as np
from ase.units import GPa

from potentials.calculator import PotentialCalculator
from potentials.plots import save
from potentials.properties import elastic_constants, equation_of_state, fit_birch_murnaghan, phonons
from potentials.properties.elastic import moduli
from potentials.properties.eos import plot_eos
from potentials.properties.phonons import plot_bands


def dft_eos(frames, a_range=(3.0, 3.6)):
    """Birch-Murnaghan fit of the Volume_BCC frames whose lattice constant lies in ``a_range`` (Å)."""
    chosen = [a for a in frames if a.info["config_type"] == "Volume_BCC"
              and a_range[0] - 1e-6 <= a.cell.cellpar()[0] <= a_range[1] + 1e-6]
    v = np.array([a.get_volume() for a in chosen])
    e = np.array([a.get_potential_energy() for a in chosen])
    return v, e, fit_birch_murnaghan(v, e)


def dft_elastic(frames):
    """C (GPa, Voigt order) by least squares over the Elastic_BCC frames: σ = σ0 + C ε, ε from a cube."""
    chosen = [a for a in frames if a.info["config_type"] == "Elastic_BCC"]
    a_ref = np.mean([a.get_volume() ** (1 / 3) for a in chosen])  # its error is absorbed by σ0
    rows, stresses = [], []
    for atoms in chosen:
        m = np.linalg.solve(np.eye(3) * a_ref, atoms.cell.array)
        eps = 0.5 * (m + m.T) - np.eye(3)
        rows.append([eps[0, 0], eps[1, 1], eps[2, 2], 2 * eps[1, 2], 2 * eps[0, 2], 2 * eps[0, 1], 1.0])
        stresses.append(atoms.get_stress(voigt=True) / GPa)
    solution, *_ = np.linalg.lstsq(np.array(rows), np.array(stresses), rcond=None)
    c = solution[:6].T
    return 0.5 * (c + c.T), len(chosen)


def cubic(c: np.ndarray) -> dict[str, float]:
    return {"C11": float(np.mean(np.diag(c)[:3])), "C12": float(np.mean([c[0, 1], c[0, 2], c[1, 2]])),
            "C44": float(np.mean(np.diag(c)[3:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--out", default="ta_properties")
    parser.add_argument("--supercell", type=int, default=4, help="phonon supercell of the 2-atom cube")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = ase.io.read(args.data, ":")
    calc = PotentialCalculator.from_file(args.model, dtype="float64")
    start = ase.build.bulk("Ta", "bcc", a=3.32, cubic=True)

    v_dft, e_dft, fit_dft = dft_eos(frames)
    c_dft, n_elastic = dft_elastic(frames)
    eos = equation_of_state(start, calc, volume_range=0.08, points=11)
    elastic = elastic_constants(start, calc)
    ph = phonons(elastic.atoms, calc, (args.supercell,) * 3)

    save(plot_eos(eos.volumes, eos.energies, eos.fit, "bcc Ta", reference=(v_dft, e_dft, fit_dft),
                  reference_label="DFT"),
         out / "ta_eos.png")
    save(plot_bands(ph, f"bcc Ta, model ({ph.method})"), out / "ta_phonons.png")
    record = {
        "model": {"a0_A": eos.fit["V0"] ** (1 / 3), "B0_GPa": eos.fit["B0_GPa"], "B0_prime": eos.fit["B0_prime"],
                  **cubic(elastic.c), **moduli(elastic.c), "a_relaxed_A": elastic.atoms.cell.cellpar()[0],
                  "phonon_special_points": {p["label"]: p["frequencies_THz"] for p in ph.special_points},
                  "imaginary_modes": ph.imaginary_modes},
        "dft": {"a0_A": fit_dft["V0"] ** (1 / 3), "B0_GPa": fit_dft["B0_GPa"], "B0_prime": fit_dft["B0_prime"],
                **cubic(c_dft), **moduli(c_dft), "eos_frames": len(v_dft), "elastic_frames": n_elastic},
    }
    (out / "ta_bcc.json").write_text(json.dumps(record, indent=2))
    print(f"{'':<12}{'model':>10}{'DFT':>10}")
    for key in ("a0_A", "B0_GPa", "B0_prime", "C11", "C12", "C44"):
        print(f"{key:<12}{record['model'][key]:>10.3f}{record['dft'][key]:>10.3f}")
    for key in ("bulk_modulus_GPa", "shear_modulus_GPa"):
        print(f"{key:<18} model {record['model'][key]['hill']:.1f}, DFT {record['dft'][key]['hill']:.1f} (Hill)")
    for label, freqs in record["model"]["phonon_special_points"].items():
        print(f"phonons at {label}: " + " ".join(f"{f:.2f}" for f in freqs[:3]) + " THz")


if __name__ == "__main__":
    main()
