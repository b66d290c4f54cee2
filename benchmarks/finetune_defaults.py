"""The measurement behind the fine-tuning defaults (``finetune.reference_energies``, ``finetune.lr``).

A base EGNN is trained on EMT Cu, Ag, Au; it is then fine-tuned on new EMT frames, once with the same labels and
once with every atom's energy shifted by a constant per element (another "DFT setting"), with the reference
energies kept or refitted and at several learning rates. Prints a table of the test energy and force errors and
writes it to ``--out`` (JSON).  ``python -m benchmarks.finetune_defaults --out results/finetune_defaults.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import ase.io
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from potentials.datasets import emt
from tests.train_config import train_config

#: Per-atom energy offsets of the "other DFT setting", eV.
OFFSETS = {"Cu": 0.3, "Ag": -0.2, "Au": 0.1}
COMMON = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.max_time=null", "figures=false",
          "model.channels=16", "model.num_layers=2", "checkpoint.every_n_minutes=null", "cutoff=4.5"]


def _frames(path: Path, n: int, seed: int, offsets: dict[str, float]) -> Path:
    frames = emt.generate(seed=seed, n_structures=n)
    for atoms in frames:
        shift = sum(offsets.get(s, 0.0) for s in atoms.get_chemical_symbols())
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy() + shift,
                                           forces=atoms.get_forces())
    ase.io.write(path, frames, format="extxyz")
    return path


def main(argv: list[str] | None = None) -> None:
    from potentials.training.run import run

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base-structures", type=int, default=300)
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--structures", type=int, default=32, help="fine-tuning frames (a quarter is the test split)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-3, 1e-3, 3e-4])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = train_config(tmp / "base", tmp / "data", *COMMON, f"data.source.n_structures={args.base_structures}",
                            f"trainer.max_epochs={args.base_epochs}")
        summary = run(base, overrides=[])
        rows.append({"run": "base", "labels": "base", "test": summary["test"]})
        data = {"same": _frames(tmp / "same.extxyz", args.structures, 11, {}),
                "shifted": _frames(tmp / "shifted.extxyz", args.structures, 11, OFFSETS)}
        # the base at step 0 on the new frames, then fine-tuned: each labelling with E0 kept and refitted, and
        # the learning rates
        grid = [(labels, mode, 1e-3, 0) for labels in data for mode in ("keep", "refit")]
        grid += [(labels, mode, 1e-3, args.epochs) for labels in data for mode in ("keep", "refit")]
        grid += [("shifted", "refit", lr, args.epochs) for lr in args.lrs if lr != 1e-3]
        for labels, mode, lr, epochs in grid:
            name = f"{labels}-{mode}-lr{lr:g}-ep{epochs}"
            cfg = train_config(tmp / name, tmp / "data", *COMMON, "data=ase", f"data.path={data[labels]}",
                               "data.split.val=0.125", "data.split.test=0.25", f"trainer.max_epochs={epochs}",
                               f"init_from={tmp / 'base' / 'model.pt'}", f"finetune.reference_energies={mode}",
                               f"finetune.lr={lr}")
            summary = run(cfg, overrides=[])
            rows.append({"run": name, "labels": labels, "reference_energies": mode, "lr": lr, "epochs": epochs,
                         "test": summary["test"]})
    print(f"{'run':<32} {'energy MAE meV/atom':>20} {'force MAE meV/Å':>16}")
    for row in rows:
        t = row["test"]
        print(f"{row['run']:<32} {t['test/energy_mae']:>20.1f} {t['test/force_mae']:>16.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
