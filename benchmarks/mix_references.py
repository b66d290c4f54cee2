"""Energy MAE per dataset of a two-setting EMT mix, with ``data.per_dataset_references`` off and on.

The same rattled 8-atom Cu-Ag-Au fcc cells are labelled twice with EMT, the second time with every energy raised by
``--shift`` eV per Cu atom (two "DFT settings" that disagree on the Cu reference); a tiny EGNN trains on the mix of
both for a few epochs with the option off, then on, and the test energy MAE (meV/atom) per dataset is printed as a
Markdown table.  About 30 s per run on two CPU cores::

    python -m benchmarks.mix_references --shift 0.5 2.0 --seeds 0 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import tempfile
from pathlib import Path

import ase.build
import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from hydra import compose, initialize_config_dir

from potentials.conf import CONFIG_DIR
from potentials.datasets import emt
from potentials.training.run import register_resolvers, run

TRAIN = ["logger=csv", "trainer.max_time=null", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "model.channels=8", "model.num_layers=1", "dtype=float64",
         "demo_relax=false", "figures=false", "export=false", "checkpoint.every_n_minutes=null", "test=true",
         "trainer.max_epochs=10", "training.lr=0.02", "data.batch_size=2"]


def write_settings(root: Path, n: int, shift: float) -> tuple[Path, Path]:
    rng = np.random.default_rng(4)
    cells = []
    for k in range(n):
        symbols = list(rng.choice(["Cu", "Ag", "Au"], size=8))
        atoms = ase.build.bulk("Cu", "fcc", a=emt.lattice_constant(symbols), cubic=True).repeat((2, 1, 1))
        atoms.set_chemical_symbols(symbols)
        atoms.rattle(0.05, seed=k)
        cells.append(atoms)
    paths = []
    for name, offset in (("plain", 0.0), ("shifted", shift)):
        frames = []
        for atoms in cells:
            atoms = emt.label(atoms.copy(), record=len(frames))
            results = dict(atoms.calc.results)
            results["energy"] += offset * int((atoms.numbers == 29).sum())
            atoms.calc = SinglePointCalculator(atoms, **results)
            frames.append(atoms)
        paths.append(root / f"{name}.extxyz")
        ase.io.write(paths[-1], frames)
    return paths[0], paths[1]


def measure(root: Path, plain: Path, shifted: Path, option: bool, seed: int) -> dict[str, float]:
    register_resolvers()
    run_dir = root / f"{option}-{seed}"
    overrides = [f"run_dir={run_dir}", f"data_root={root}", f"seed={seed}", *TRAIN, "data=mix",
                 "+data@data.datasets.plain=ase", f"data.datasets.plain.path={plain}",
                 "+data@data.datasets.shifted=ase", f"data.datasets.shifted.path={shifted}",
                 "data.datasets.plain.split.val=3", "data.datasets.plain.split.test=4",
                 "data.datasets.shifted.split.val=3", "data.datasets.shifted.split.test=4",
                 f"data.per_dataset_references={str(option).lower()}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run(cfg)
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    return {k: test[f"test/{k}/energy_mae"] for k in ("plain", "shifted")} | {
        "pooled": test["test/energy_mae"], "force": test["test/force_mae"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shift", type=float, nargs="+", default=[0.5], help="eV per Cu atom")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--structures", type=int, default=24)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(f"measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {args.structures} structures per "
          "dataset\n")
    print("| Cu shift (eV) | seed | per-dataset refs "
          "| energy MAE plain | shifted | pooled (meV/atom) | force MAE (meV/Å) |")
    print("|---|---|---|---|---|---|---|")
    for shift in args.shift:
        root = Path(tempfile.mkdtemp(prefix="mixrefs-"))
        plain, shifted = write_settings(root, args.structures, shift)
        for seed in args.seeds:
            for option in (False, True):
                r = measure(root, plain, shifted, option, seed)
                print(f"| {shift:g} | {seed} | {'on' if option else 'off'} | {r['plain']:.1f} | {r['shifted']:.1f} "
                      f"| {r['pooled']:.1f} | {r['force']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
