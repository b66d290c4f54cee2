"""Committee against shallow ensembles on EMT Cu, in and far out of the training distribution.

EGNN (channels 32, 2 layers) trained on 200 EMT Cu structures (``data=emt``, default split, seed 0, float32) for
``--epochs`` epochs as a committee of 4, a shallow ensemble of 4 heads with the Gaussian NLL of energies and force
components (``shallow``) and one with the NLL of energies only (``shallow-energy``).  "in": 40 further structures
drawn like the training set (``emt.generate(seed=101)``); "out": 40 strained up to 8 % and rattled by 0.25–0.35 Å
(``seed=102, max_strain=0.08, rattle=(0.25, 0.35)``).  Spearman between predicted std and actual error (per atom,
per structure, energy per structure), RMS std against RMSE after the validation-split calibration.

``python -m benchmarks.uncertainty_emt`` writes ``benchmarks/results/uncertainty-emt.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from tests.train_config import train_config

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("committee", "shallow", "shallow-nll", "shallow-energy")


def render(result: dict) -> str:
    """The markdown report of ``result`` (the JSON this script writes)."""
    rows, size = result["rows"], result["args"]["size"]
    cols = " | ".join(f"{r['kind']} ({size})" for r in rows)
    commands = result["command"] if isinstance(result["command"], list) else [result["command"]]
    lines = ["# Committee against shallow ensembles on EMT Cu", "", f"Date: {result['date']}. Command: "
             + "; ".join(f"`{c}`" for c in commands) + ". One torch thread, float32; setup in the script's "
             "docstring. shallow: heads trained with the β-NLL (β = 1, the default) of energies and force "
             "components; shallow-nll: with the plain Gaussian NLL of both; shallow-energy: of energies only.", "",
             f"| | {cols} |", "|---|" + "---|" * len(rows)]

    def line(label, get, fmt="{:.2f}"):
        cells = " | ".join(f"{fmt.format(get(r['in']))} / {fmt.format(get(r['out']))}" for r in rows)
        lines.append(f"| {label}, in / out | {cells} |")

    line("force RMSE (meV/Å, per component)", lambda s: s["force_rmse_meV_per_A"], "{:.0f}")
    line("Spearman, forces per atom", lambda s: s["forces_per_atom"]["spearman"])
    line("Spearman, forces per structure", lambda s: s["forces_per_structure"]["spearman"])
    line("Spearman, energy per structure", lambda s: s["energy_per_structure"]["spearman"])
    line("RMS force std per atom (eV/Å)", lambda s: s["forces_per_atom"]["rms_std"], "{:.3f}")
    line("force RMSE per atom, norm of ΔF (eV/Å)", lambda s: s["forces_per_atom"]["rmse"], "{:.3f}")
    lines.append("| calibration scalars (energy, forces) | " + " | ".join(
        f"{r['calibration']['energy']:.2f}, {r['calibration']['forces']:.2f}" for r in rows) + " |")
    lines.append("| training time (s), two busy cores | " + " | ".join(f"{r['train_seconds']:.0f}" for r in rows)
                 + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from potentials.datasets import emt
    from potentials.evaluate import predict, to_graphs
    from potentials.export import load
    from potentials.training.run import run
    from potentials.uncertainty import calibration_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="uncertainty-emt", help="report file names: <out-dir>/<name>.{md,json}")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="train nothing: merge these result files' rows into <out-dir>/<name>.{md,json}")
    args = p.parse_args(argv)
    if args.merge:
        results = [json.loads(f.read_text()) for f in args.merge]
        merged = {**results[0], "rows": [r for res in results for r in res["rows"]],
                  "command": [c for res in results for c in (res["command"] if isinstance(res["command"], list)
                                                              else [res["command"]])]}
        (args.out_dir / f"{args.name}.json").write_text(json.dumps(merged, indent=2))
        (args.out_dir / f"{args.name}.md").write_text(render(merged))
        return
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("potentials").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    sets = {"in": emt.generate(seed=101, n_structures=40, elements=("Cu",)),
            "out": emt.generate(seed=102, n_structures=40, elements=("Cu",), max_strain=0.08, rattle=(0.25, 0.35))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            extra = {"shallow-nll": ["ensemble.nll_beta=0"],
                     "shallow-energy": ["ensemble.forces_nll_weight=0", "ensemble.nll_beta=0"]}.get(kind, [])
            cfg = train_config(Path(tmp) / kind, Path(tmp) / "data", "logger=csv", "trainer.enable_progress_bar=false",
                               "trainer.enable_model_summary=false", "trainer.max_time=null", "figures=false",
                               "demo_relax=false", "checkpoint.every_n_minutes=null", "data=emt",
                               "data.source.n_structures=200", "+data.source.elements=[Cu]", "model=egnn",
                               "model.channels=32", "model.num_layers=2", f"trainer.max_epochs={args.epochs}",
                               f"ensemble.size={args.size}", f"ensemble.kind={kind.split('-')[0]}", "seed=0", *extra)
            start = time.perf_counter()
            summary = run(cfg, overrides=[])
            seconds = time.perf_counter() - start
            potential = load(summary["model"]).eval()
            row = {"kind": kind, "train_seconds": round(seconds, 1),
                   "calibration": summary.get("ensemble", {}).get("calibration")}
            for name, frames in sets.items():
                pred = predict(potential, to_graphs(frames, potential, potential.scale.dtype))
                report = calibration_report(pred)
                row[name] = {"force_rmse_meV_per_A": 1000 * float(np.sqrt(np.mean((pred.forces_pred
                                                                                     - pred.forces_ref) ** 2))),
                             **{level: {k: report[level][k] for k in ("spearman", "rms_std", "rmse", "mean_std")}
                                for level in ("forces_per_atom", "forces_per_structure", "energy_per_structure")}}
            rows.append(row)
            print(kind, json.dumps({k: row[k] for k in ("in", "out")}))
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(["python -m benchmarks.uncertainty_emt", *(sys.argv[1:] if argv is None else argv)]),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
