"""Uncertainty on real DFT data: acetylacetone (acac) trained at 300 K, tested at 300 K and 600 K, and selection.

Data: ``<shared data>/acac`` (BOTNet data sets, PBE+D3(BJ); see its PROVENANCE.md). Two parts:

1. **Spread against error.** For each model family (EGNN; Facet with ``--models egnn facet``) a committee and a shallow
   ensemble are trained on ``--train-frames`` frames of ``train_300K`` (``--val-frames`` more are the validation
   split, on which the spread is calibrated), then evaluated on ``test_MD_300K`` and ``test_MD_600K``: per-structure
   Spearman rank correlation between the predicted force std (RMS over the structure's atoms) and the actual force
   error (likewise), the same per atom, the mean predicted std at 600 K against 300 K, and the force RMSE.  The
   calibration figure bins the per-structure predicted std against the RMSE.
2. **Selection.** The EGNN committee scores every frame of the ``train_600K`` pool by its maximum per-atom force std
   and picks ``--select-n`` frames as ``potentials select`` does (:mod:`potentials.select`); the same number of
   random frames is the control.  For each seed, committee member 0 is fine-tuned (``init_from``, same epochs, the
   fine-tuning seed sets the batch order) on its training frames plus the picked ones, and the
   ``test_MD_600K`` force error is measured; the "none" row fine-tunes on the training frames alone (what the extra
   epochs alone give).  Mean and spread over ``--seeds``.

``python -m benchmarks.uncertainty_acac`` writes ``benchmarks/results/uncertainty.{md,json,png}``.  The default set
runs in about half an hour on two busy cores; ``--models egnn facet`` adds Facet.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import ase.io
import numpy as np
import torch

from benchmarks.structures import shared_data_dir
from tests.train_config import train_config

RESULTS = Path(__file__).resolve().parent / "results"
COMMON = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "trainer.max_time=null", "figures=false", "demo_relax=false", "checkpoint.every_n_minutes=null",
          "cutoff=5.0", "data=ase", "data.batch_size=8", "data.split.test=0", "test=false"]
KINDS = ("committee", "shallow", "shallow-nll", "shallow-energy")
MODELS = {"egnn": ["model=egnn", "model.channels=32", "model.num_layers=2"],
          "facet": ["model=facet", "model.channels=16", "model.num_layers=2"]}


def _acac(name: str) -> list[ase.Atoms]:
    path = shared_data_dir() / "acac" / f"{name}.xyz"
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data file missing: {path}; the shared data folder has no acac/ set")
    return ase.io.read(path, index=":")


def _write_set(folder: Path, train: list[ase.Atoms], val: list[ase.Atoms]) -> list[str]:
    """The training file (train frames then val frames) and the index files that fix the split; overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    ase.io.write(folder / "data.extxyz", [*train, *val], format="extxyz")
    (folder / "val.txt").write_text("\n".join(str(len(train) + k) for k in range(len(val))) + "\n")
    (folder / "train.txt").write_text("\n".join(str(k) for k in range(len(train))) + "\n")
    return [f"data.path={folder / 'data.extxyz'}",
            f"data.split.index_files={{train:'{folder / 'train.txt'}',val:'{folder / 'val.txt'}'}}"]


def _train(run_dir: Path, data: list[str], *overrides: str) -> tuple[dict, float]:
    from potentials.training.run import run

    start = time.perf_counter()
    summary = run(train_config(run_dir, run_dir / "data_root", *COMMON, *data, *overrides), overrides=[])
    return summary, time.perf_counter() - start


def _predict(model_path: Path, frames: list[ase.Atoms]):
    from potentials.evaluate import predict, to_graphs
    from potentials.export import load

    potential = load(model_path).eval()
    return predict(potential, to_graphs(frames, potential, potential.scale.dtype), batch_size=32)


def _levels(pred) -> dict:
    from potentials.uncertainty import calibration_report

    report = calibration_report(pred)
    rmse = float(np.sqrt(np.mean((pred.forces_pred - pred.forces_ref) ** 2)))
    return {"force_rmse_meV_per_A": 1000 * rmse,
            **{level: {k: report[level][k] for k in ("spearman", "mean_std", "rms_std", "rmse", "binned")}
               for level in ("forces_per_structure", "forces_per_atom", "energy_per_structure")}}


def _timed(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each ``step()`` over ``repeats`` calls after two warm-up calls, the steps taken in turn
    (round-robin: a burst of other work on a shared machine slows every variant alike, not the one it hits)."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def part_step_cost(tmp: Path, args, frames: list[ase.Atoms]) -> list[dict]:
    """Seconds per training step (batch of 8 frames) and per inference call (32 frames) of each variant."""
    from torch_geometric.data import Batch

    from potentials.graph import AtomicGraph

    train_batch = Batch.from_data_list([AtomicGraph.from_atoms(a, 5.0) for a in frames[:8]])
    infer_batch = Batch.from_data_list([AtomicGraph.from_atoms(a, 5.0) for a in frames[:32]])
    return [row for family in args.models for row in _step_cost(tmp, args, family, train_batch, infer_batch)]


def _step_cost(tmp: Path, args, family: str, train_batch, infer_batch) -> list[dict]:
    from hydra.utils import instantiate

    from potentials.potential import Potential, head_gradients
    from potentials.training.ensemble import EnsembleLoss
    from potentials.training.loss import PotentialLoss
    from potentials.uncertainty import EnsemblePotential, ShallowEnsemble

    model_cfg = train_config(tmp, tmp, *MODELS[family], "cutoff=5.0", "data_stats.avg_num_neighbors=12").model

    def potential(heads: int) -> Potential:
        torch.manual_seed(0)
        model = instantiate(model_cfg)
        return Potential(ShallowEnsemble(model, heads) if heads else model, 5.0,
                         {1: -13.6, 6: -1030.0, 8: -2040.0}, scale=1.0)

    def trainer(pot: Potential, loss, head_forces: bool | str):
        opt = torch.optim.Adam(pot.parameters(), lr=1e-4)
        pot.train()

        def step():
            opt.zero_grad()
            if head_forces == "loop":  # one backward pass per head
                batch = train_batch.clone()
                batch.pos.requires_grad_(True)
                out = pot(batch, compute_forces=False, compute_stress=False, create_graph=True)
                (grad,) = head_gradients(out["energy_heads"], [batch.pos], create_graph=True, batched=False)
                out["forces_heads"] = -grad
                out["forces"] = -grad.mean(0)
            else:
                out = pot(train_batch, compute_stress=False, create_graph=True, head_forces=bool(head_forces))
            loss(out, train_batch)["total"].backward()
            opt.step()
        return step

    rows = []
    base = PotentialLoss(energy_weight=1.0, forces_weight=10.0)
    variants = {"single model": trainer(potential(0), base, False),
                "shallow, energy NLL": trainer(potential(args.size), EnsembleLoss(base, 1.0, 0.0), False),
                "shallow, energy + force NLL (batched)": trainer(potential(args.size), EnsembleLoss(base), True),
                "shallow, energy + force NLL (loop)": trainer(potential(args.size), EnsembleLoss(base), "loop")}
    seconds = _timed(variants, args.timing_repeats)
    single = seconds["single model"]
    seconds[f"committee of {args.size} (= {args.size} × single)"] = args.size * single
    for name, value in seconds.items():
        rows.append({"model": family, "what": f"training step: {name}", "ms": 1000 * value,
                     "relative": value / single})
    shallow = EnsemblePotential([potential(args.size).eval()], kind="shallow")
    member = shallow.members[0]
    single_model = potential(0).eval()

    def batched():  # one backbone pass, every head's forces from one vmap-batched backward pass
        batch = infer_batch.clone()
        batch.pos.requires_grad_(True)
        out = member(batch, compute_forces=False, compute_stress=False)
        head_gradients(out["energy_heads"], [batch.pos], create_graph=False, batched=True)

    def per_head():  # the per-head reference: one full evaluation per head
        try:
            for k in range(args.size):
                member.model.active_head = k
                member(infer_batch, compute_stress=False)
        finally:
            member.model.active_head = None

    infer = _timed({"single model": lambda: single_model(infer_batch, compute_stress=False),
                    "shallow forces_std (one backbone pass, one backward per head)":
                        lambda: shallow(infer_batch, compute_stress=False),
                    "shallow forces_std (one backbone pass, batched backward)": batched,
                    "shallow forces_std (one evaluation per head)": per_head}, args.timing_repeats)
    for name, value in infer.items():
        rows.append({"model": family, "what": f"inference, 32 frames: {name}", "ms": 1000 * value,
                     "relative": value / infer["single model"]})
    return rows


def part_uncertainty(tmp: Path, args, train, val, tests) -> tuple[list[dict], dict]:
    rows, models = [], {}
    data = _write_set(tmp / "set", train, val)
    for family in args.models:
        for kind in args.kinds:
            name = f"{family}-{kind}"
            extra = [f"ensemble.size={args.size}", f"ensemble.kind={kind.split('-')[0]}",
                     f"trainer.max_epochs={args.epochs}", f"seed={args.seed}"]
            if kind in ("shallow-nll", "shallow-energy"):  # the plain Gaussian NLL
                extra.append("ensemble.nll_beta=0")
            if kind == "shallow-energy":  # of energies only
                extra.append("ensemble.forces_nll_weight=0")
            summary, seconds = _train(tmp / name, data, *MODELS[family], *extra)
            models[name] = Path(summary["model"])
            row = {"model": family, "kind": kind, "size": args.size, "epochs": args.epochs,
                   "train_seconds": round(seconds, 1),
                   "calibration": summary.get("ensemble", {}).get("calibration")}
            for label, frames in tests.items():
                row[label] = _levels(_predict(models[name], frames))
            row["std_ratio_600_300"] = (row["test_MD_600K"]["forces_per_structure"]["mean_std"]
                                        / row["test_MD_300K"]["forces_per_structure"]["mean_std"])
            row["rmse_ratio_600_300"] = (row["test_MD_600K"]["force_rmse_meV_per_A"]
                                         / row["test_MD_300K"]["force_rmse_meV_per_A"])
            rows.append(row)
            logging.getLogger("benchmarks").warning("%s: %s", name, _row_line(row))
    return rows, models


def _row_line(row: dict) -> str:
    t3, t6 = row["test_MD_300K"], row["test_MD_600K"]
    return (f"{row['model']:<6} {row['kind']:<10} "
            f"{t3['forces_per_structure']['spearman']:>6.2f} {t6['forces_per_structure']['spearman']:>6.2f} "
            f"{t3['forces_per_atom']['spearman']:>6.2f} {t6['forces_per_atom']['spearman']:>6.2f} "
            f"{1000 * t3['forces_per_structure']['mean_std']:>7.0f} "
            f"{1000 * t6['forces_per_structure']['mean_std']:>7.0f} "
            f"{row['std_ratio_600_300']:>5.2f} {t3['force_rmse_meV_per_A']:>6.0f} {t6['force_rmse_meV_per_A']:>6.0f} "
            f"{row['rmse_ratio_600_300']:>5.2f} {row['train_seconds']:>6.0f}")


def part_selection(tmp: Path, args, train, val, pool, test600, committee: Path) -> dict:
    from potentials.calculator import PotentialCalculator
    from potentials.select import frame_scores, select_frames

    calc = PotentialCalculator.from_file(committee)
    scores = frame_scores(pool, calc)
    picked = select_frames(pool, scores, args.select_n).indices
    member0 = committee.parent / "members" / "0" / "model.pt"
    before = _predict(member0, test600)
    results = {"picked": picked, "pool_score_mean": float(scores.mean()),
               "picked_score_mean": float(scores[picked].mean()),
               "base_member_force_rmse_meV_per_A": 1000 * float(np.sqrt(np.mean((before.forces_pred
                                                                                 - before.forces_ref) ** 2))),
               "runs": []}
    for seed in args.seeds:
        rng = np.random.default_rng(1000 + seed)
        random_pick = sorted(rng.choice(len(pool), size=args.select_n, replace=False).tolist())
        for strategy, added in (("uncertainty", picked), ("random", random_pick), ("none", [])):
            name = f"select-{strategy}-{seed}"
            data = _write_set(tmp / name / "set", [*train, *(pool[k] for k in added)], val)
            _, seconds = _train(tmp / name, data, *MODELS["egnn"], f"init_from={member0}", f"seed={seed}",
                                f"trainer.max_epochs={args.finetune_epochs}", f"finetune.lr={args.finetune_lr}")
            pred = _predict(tmp / name / "model.pt", test600)
            rmse = 1000 * float(np.sqrt(np.mean((pred.forces_pred - pred.forces_ref) ** 2)))
            mae = 1000 * float(np.mean(np.abs(pred.forces_pred - pred.forces_ref)))
            results["runs"].append({"strategy": strategy, "seed": seed, "force_rmse_meV_per_A": rmse,
                                    "force_mae_meV_per_A": mae, "seconds": round(seconds, 1),
                                    "mean_score_added": float(scores[added].mean()) if added else None})
            logging.getLogger("benchmarks").warning("%s: force RMSE %.1f meV/Å (%.0f s)", name, rmse, seconds)
    summary = {}
    for strategy in ("uncertainty", "random", "none"):
        values = np.array([r["force_rmse_meV_per_A"] for r in results["runs"] if r["strategy"] == strategy])
        summary[strategy] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
                             else 0.0, "min": float(values.min()), "max": float(values.max()), "n": len(values)}
    results["summary"] = summary
    return results


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["model"] for r in rows))
    ncols = max(sum(r["model"] == f for r in rows) for f in families)
    fig, axes = plt.subplots(len(families), ncols, figsize=(4.0 * ncols, 4 * len(families)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for row in rows:
        r = families.index(row["model"])
        ax = axes[r][[x for x in rows if x["model"] == row["model"]].index(row)]
        ax.set_visible(True)
        everything = []
        for label, marker in (("test_MD_300K", "o-"), ("test_MD_600K", "s-")):
            level = row[label]["forces_per_structure"]
            x = 1000 * np.array([b["std_rms"] for b in level["binned"]])
            y = 1000 * np.array([b["rmse"] for b in level["binned"]])
            everything += [*x, *y]
            ax.loglog(x, y, marker, label=f"{label[8:]} (Spearman {level['spearman']:.2f})")
        lo, hi = min(everything) / 1.3, max(everything) * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="calibrated")
        ax.set_title(f"{row['model']} {row['kind']} ({row['size']})")
        ax.set_xlabel("predicted force std (meV/Å, per structure)")
        ax.set_ylabel("force RMSE (meV/Å, per structure)")
        ax.legend(fontsize=8)
    fig.suptitle("acac, trained on 300 K: binned predicted std against actual error (10 equal-count bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(result: dict, path: Path) -> None:
    a = result["args"]
    commands = result["command"] if isinstance(result["command"], list) else [result["command"]]
    lines = ["# Uncertainty on acac (trained at 300 K, tested at 300 K and 600 K)", "",
             f"Date: {result['date']}. Machine: {result['machine']}, {a['threads']} torch thread(s), float32.",
             "Commands: " + "; ".join(f"`{c}`" for c in commands), "",
             f"Training: {a['train_frames']} frames of train_300K (validation: {a['val_frames']} more, the spread's "
             f"calibration is fitted there), ensemble size {a['size']}, seed {a['seed']}; "
             "EGNN channels 32, 2 layers; Facet channels 16, lmax 1, 2 layers; cutoff 5 Å. Tests: all 650 frames "
             "of test_MD_300K and test_MD_600K. Per structure: the RMS over its atoms of the predicted force std "
             "and of the force error |ΔF_i|.", "",
             "| model | kind | Spearman per structure 300 K / 600 K | Spearman per atom 300 K / 600 K | mean std "
             "300 K / 600 K (meV/Å) | std ratio 600/300 | force RMSE 300 K / 600 K (meV/Å) | RMSE ratio | "
             "epochs | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["uncertainty"]:
        t3, t6 = row["test_MD_300K"], row["test_MD_600K"]
        lines.append(
            f"| {row['model']} | {row['kind']} | {t3['forces_per_structure']['spearman']:.2f} / "
            f"{t6['forces_per_structure']['spearman']:.2f} | {t3['forces_per_atom']['spearman']:.2f} / "
            f"{t6['forces_per_atom']['spearman']:.2f} | {1000 * t3['forces_per_structure']['mean_std']:.0f} / "
            f"{1000 * t6['forces_per_structure']['mean_std']:.0f} | {row['std_ratio_600_300']:.2f} | "
            f"{t3['force_rmse_meV_per_A']:.0f} / {t6['force_rmse_meV_per_A']:.0f} | {row['rmse_ratio_600_300']:.2f} | "
            f"{row.get('epochs', a['epochs'])} | {row['train_seconds']:.0f} |")
    lines += ["", f"Figure: `{a['name']}.png` (binned per-structure predicted std against RMSE, both test sets). "
              "shallow: heads trained with the β-NLL (β = 1, the default) of energies and force components; "
              "shallow-nll: with the plain Gaussian NLL of both; shallow-energy: of energies only. Training times "
              "on two cores shared with other work.", "", "## Cost", "",
              f"Median of {result.get('timing_args', a)['timing_repeats']} calls; training step: a batch of 8 acac "
              "frames, forward, loss, backward and Adam step; inference: energies, forces and spread of 32 frames.", "",
              "| model | what | ms | × single model |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['what']} | {r['ms']:.1f} | {r['relative']:.2f} |" for r in result["step_cost"]]
    lines.append("")
    sel = result.get("selection")
    if sel:
        lines += ["## Selection from the 600 K pool", "",
                  f"The EGNN committee scored the {a['pool_frames']} frames of train_600K (mean max force std "
                  f"{1000 * sel['pool_score_mean']:.0f} meV/Å; the {a['select_n']} picked: "
                  f"{1000 * sel['picked_score_mean']:.0f} meV/Å). Committee member 0 (test_MD_600K force RMSE "
                  f"{sel['base_member_force_rmse_meV_per_A']:.0f} meV/Å) was fine-tuned with init_from for "
                  f"{a['finetune_epochs']} epochs at lr {a['finetune_lr']:g} on its training frames plus "
                  f"{a['select_n']} frames, seeds {', '.join(map(str, a['seeds']))} (batch order; the random pick "
                  "also changes with the seed).", "",
                  "| added frames | test_MD_600K force RMSE, mean ± std over seeds (meV/Å) | min – max |",
                  "|---|---|---|"]
        for strategy, s in sel["summary"].items():
            label = {"uncertainty": f"{a['select_n']} by uncertainty", "random": f"{a['select_n']} random",
                     "none": "none (fine-tuning alone)"}[strategy]
            lines.append(f"| {label} | {s['mean']:.1f} ± {s['std']:.1f} | {s['min']:.1f} – {s['max']:.1f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def merge(files: list[Path], out_dir: Path, name: str) -> None:
    """One report from several runs' JSON files: the first's settings and selection, everyone's rows."""
    results = [json.loads(Path(f).read_text()) for f in files]
    merged = results[0]
    merged["command"] = [c for r in results for c in (r["command"] if isinstance(r["command"], list)
                                                        else [r["command"]])]
    for extra in results[1:]:
        for row in extra.get("uncertainty", []):
            row.setdefault("epochs", extra["args"]["epochs"])
        merged["uncertainty"] += extra.get("uncertainty", [])
        # timings: a later file's rows replace all earlier ones of the models it timed (one run per model)
        new = {r["model"] for r in extra.get("step_cost", [])}
        merged["step_cost"] = [r for r in merged["step_cost"] if r["model"] not in new]
        merged["step_cost"] += extra.get("step_cost", [])
        if extra.get("step_cost"):
            merged["timing_args"] = extra["args"]
    merged["args"]["name"] = name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(merged, indent=2))
    figure(merged["uncertainty"], out_dir / f"{name}.png")
    report(merged, out_dir / f"{name}.md")
    print(f"wrote {out_dir / name}.{{md,json,png}}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["egnn"], choices=sorted(MODELS))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                   help="shallow: β-NLL (β = 1, the default) of energies and forces; shallow-nll: plain Gaussian "
                        "NLL of both; shallow-energy: of energies only")
    p.add_argument("--size", type=int, default=4, help="committee members / shallow heads")
    p.add_argument("--train-frames", type=int, default=200)
    p.add_argument("--val-frames", type=int, default=50)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--select-n", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--no-selection", action="store_true", help="part 1 only")
    p.add_argument("--timing-only", action="store_true", help="the cost table only")
    p.add_argument("--timing-repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="uncertainty", help="report file names: <out-dir>/<name>.{md,json,png}")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="train nothing: merge these result files (rows of the later ones after the first's) into "
                        "<out-dir>/<name>.{md,json,png}")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out_dir, args.name)
        return
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("potentials").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    base = _acac("train_300K")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(base))
    train = [base[k] for k in order[:args.train_frames]]
    val = [base[k] for k in order[args.train_frames:args.train_frames + args.val_frames]]
    tests = {name: _acac(name) for name in ("test_MD_300K", "test_MD_600K")}
    pool = _acac("train_600K")
    started = time.perf_counter()
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
              "command": " ".join(["python -m benchmarks.uncertainty_acac", *(sys.argv[1:] if argv is None else argv)]),
              "args": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "pool_frames": len(pool)}}
    print(f"{'model':<6} {'kind':<10} {'rho_s3':>6} {'rho_s6':>6} {'rho_a3':>6} {'rho_a6':>6} {'std3':>7} "
          f"{'std6':>7} {'ratio':>5} {'rmse3':>6} {'rmse6':>6} {'ratio':>5} {'sec':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["step_cost"] = part_step_cost(tmp / "timing", args, train)
        for row in result["step_cost"]:
            print(f"{row['model']:<6} {row['what']:<70} {row['ms']:8.1f} ms  ×{row['relative']:.2f}")
        if args.timing_only:
            (args.out_dir / f"{args.name}.json").parent.mkdir(parents=True, exist_ok=True)
            (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
            return
        rows, models = part_uncertainty(tmp, args, train, val, tests)
        result["uncertainty"] = rows
        for row in rows:
            print(_row_line(row))
        committee = models.get("egnn-committee")
        if not args.no_selection and committee is not None:
            result["selection"] = part_selection(tmp, args, train, val, pool, tests["test_MD_600K"], committee)
            for strategy, s in result["selection"]["summary"].items():
                print(f"selection {strategy:<12} test_MD_600K force RMSE {s['mean']:.1f} ± {s['std']:.1f} meV/Å")
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    figure(rows, args.out_dir / f"{args.name}.png")
    report(result, args.out_dir / f"{args.name}.md")
    print(f"wrote {args.out_dir / args.name}.{{md,json,png}} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
