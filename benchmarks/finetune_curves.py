"""Data efficiency of fine-tuning: learning curves against training from scratch, forgetting with and without
replay, and a new element in a periodic set.

Three experiments per model family, each a set of ordinary training runs (``init_from=``, ``data=mix``):

1. **rMD17 learning curves.** A base model is pretrained on several rMD17 molecules (official split 01,
   ``train_01`` frames; ``--pretrain`` names them). A held-out molecule (``--target``, paracetamol by default) is
   then learnt from 25, 50, 100 and 200 of its ``train_01`` frames (``--sizes``; nested subsets), once fine-tuned
   from the base and once from scratch, for the **same number of optimiser steps** (``--steps``; the wall time of
   every run is reported too). Test: a fixed subset of the molecule's ``test_01`` frames (``--test-frames``).
2. **Forgetting.** The pretraining molecules' ``test_01`` error of the base, of each fine-tuned model, and of the
   same fine-tuning with replay: ``data=mix`` with the pretraining frames drawn for ``--replay`` of the batches.
3. **A new element, periodic.** A base trained on the embedded EMT set (Cu, Ag, Au; bulk, vacancies, slabs) is
   fine-tuned onto EMT Cu-Ni frames (Ni never seen), against scratch, and the base's Cu/Ag/Au error is measured
   after fine-tuning.

Validation frames (for ``best.ckpt``) are other ``train_01`` frames, never test frames; every run anneals
(cosine schedule by ``trainer.max_steps``). Writes ``benchmarks/results/finetune.md``, ``.json`` and ``.png``.

    python -m benchmarks.finetune_curves                       # EGNN, the default grid (~30 min on 2 cores)
    python -m benchmarks.finetune_curves --families egnn facet --budget 2
    python -m benchmarks run --only finetune                   # the same through the harness

The rMD17 files come from the shared data folder (``$POTENTIALS_SHARED_DATA``, else ``<project root>/../shared/data``),
``rmd17/npz/rmd17_<molecule>_{train,test}_01.npz``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from benchmarks import report  # selects matplotlib's Agg backend
from benchmarks.structures import CACHE_DIR, shared_data_dir

NAME = "finetune"
#: Model options of a from-scratch run and of the base, per family (a fine-tuning run takes the base's).
FAMILIES = {
    "egnn": ["model=egnn", "model.channels=32", "model.num_layers=3"],
    "facet": ["model=facet"],
    # lmax 2 and two blocks instead of the preset's 3 and 3: a step about 1.5 s -> 0.4 s on one core here
    "equiformer_v2": ["model=equiformer_v2", "model.lmax=2", "model.num_layers=2"],
}
COMMON = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "trainer.max_time=null", "trainer.max_epochs=-1", "figures=false", "demo_relax=false", "export=true",
          "test=false", "checkpoint.every_n_minutes=null", "dtype=float32", "seed=0"]
BATCH = 5
VAL_FRAMES = 50         # target molecule: validation frames from train_01 (disjoint from every training subset)
PRETRAIN_VAL = 20       # per pretraining molecule
EMT_NEW = ["Cu", "Ni"]  # the fine-tuning set of the periodic experiment: Ni is new to the base (Cu, Ag, Au)
log = logging.getLogger("benchmarks.finetune")


def _say(msg: str) -> None:
    print(f"[finetune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _npz(molecule: str, split: str) -> Path:
    path = shared_data_dir() / "rmd17" / "npz" / f"rmd17_{molecule}_{split}_01.npz"
    if not path.is_file():
        raise FileNotFoundError(f"rMD17 file missing: {path}; the shared data folder (POTENTIALS_SHARED_DATA) "
                                "needs rmd17/npz/rmd17_<molecule>_{train,test}_01.npz")
    return path


def _index_file(path: Path, indices: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{int(i)}\n" for i in indices))
    return path


class Experiment:
    """Where the runs go, their common settings, and the training and evaluation of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        # one order of each molecule's train_01 frames: the first frames validate, the next ones train (nested)
        self.order = {m: np.random.default_rng(7).permutation(1000) for m in [*args.pretrain, args.target]}

    def steps(self, n: int) -> int:
        return max(int(round(n * self.args.budget)), 20)

    # ------------------------------------------------------------------------------------------- data
    def _rmd17(self, key: str, molecule: str, n_train: int, n_val: int, weight: float | None = None) -> list[str]:
        """Overrides adding ``molecule`` (train_01: ``n_train`` frames, ``n_val`` validation frames) to a mix."""
        order = self.order[molecule]
        files = {"train": _index_file(self.work / "splits" / f"{molecule}_train{n_train}.csv",
                                      order[VAL_FRAMES:VAL_FRAMES + n_train])}
        if n_val:
            files["val"] = _index_file(self.work / "splits" / f"{molecule}_val{n_val}.csv", order[:n_val])
        d = f"data.datasets.{key}"
        out = [f"+data@{d}=rmd17", f"{d}.path={_npz(molecule, 'train')}",
               f"{d}.split.index_files={{{','.join(f'{k}:{v}' for k, v in files.items())}}}",
               f"{d}.split.test=0", f"{d}.split.val=0"]
        if weight is not None:
            out.append(f"+{d}.weight={weight:.6g}")
        return out

    def test_frames(self, molecule: str, n: int) -> list:
        from potentials.datasets import md17

        idx = np.sort(np.random.default_rng(11).permutation(1000)[:n])
        return md17.read(_npz(molecule, "test"), indices=idx)

    # ------------------------------------------------------------------------------------------- runs
    def train(self, name: str, overrides: list[str]) -> tuple[Path, float]:
        from hydra import compose, initialize_config_dir

        from potentials.conf import CONFIG_DIR
        from potentials.training.run import register_resolvers, run

        run_dir = self.work / "runs" / name
        model = run_dir / "model.pt"
        if model.is_file() and (run_dir / "wall_s").is_file() and self.args.reuse:
            return model, float((run_dir / "wall_s").read_text())
        register_resolvers()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"run_dir={run_dir}", f"data_root={self.work / 'data'}", *COMMON,
                                              *overrides])
        _say(f"{name}: training")
        start = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - start
        (run_dir / "wall_s").write_text(f"{wall:.3f}\n")
        _say(f"{name}: {wall:.0f} s")
        return model, wall

    @staticmethod
    def evaluate(model: Path, frames_by_set: dict[str, list]) -> dict[str, dict]:
        """Energy MAE (meV/atom) and force MAE (meV/Å) of ``model`` on each named set of frames."""
        from potentials.evaluate import compute_metrics, predict, to_graphs
        from potentials.export import load

        potential = load(model)
        out = {}
        for name, frames in frames_by_set.items():
            m = compute_metrics(predict(potential, to_graphs(frames, potential, torch.float32), batch_size=50))
            out[name] = {"energy_mae": m["energy_mae"], "force_mae": m["force_mae"], "n_structures": m["n_structures"]}
        return out

    def record(self, **fields) -> dict:
        self.records.append(fields)
        (self.work / "records.json").write_text(json.dumps(self.records, indent=1))
        return fields

    # ------------------------------------------------------------------------------------------- experiments
    def rmd17(self, family: str) -> None:
        a = self.args
        target = a.target
        tests = {target: self.test_frames(target, a.test_frames)}
        old = {m: self.test_frames(m, a.forget_frames) for m in a.pretrain}
        mix = ["data=mix", f"data.batch_size={BATCH}", "data.eval_batch_size=50"]
        pre = [x for m in a.pretrain for x in self._rmd17(m, m, a.pretrain_frames, PRETRAIN_VAL)]
        n_pre = len(a.pretrain) * a.pretrain_frames
        pre_steps = self.steps(a.pretrain_steps)
        base, wall = self.train(f"{family}-rmd17-base", [*FAMILIES[family], *mix, *pre, f"data.epoch_size={n_pre}",
                                                         f"trainer.max_steps={pre_steps}"])
        self.record(family=family, experiment="rmd17", kind="base", frames=n_pre, steps=pre_steps, wall_s=wall,
                    test=self.evaluate(base, {**tests, **old}))
        steps = self.steps(a.steps)
        epoch = 50 * BATCH  # validation every 50 steps whatever the training set's size
        for n in a.sizes:
            own = self._rmd17("own", target, n, VAL_FRAMES)
            common = [*mix, f"data.epoch_size={epoch}", "data.monitor_dataset=own", f"trainer.max_steps={steps}"]
            runs = {"scratch": [*FAMILIES[family], *own, *common],
                    "finetune": [*own, *common, f"init_from={base}"]}
            if n in a.replay_sizes and a.replay > 0:
                w = a.replay / (1 - a.replay) / len(a.pretrain)  # the pretraining sets draw `replay` of the batches
                replay = [x for m in a.pretrain for x in self._rmd17(m, m, a.pretrain_frames, 0, weight=w)]
                runs["finetune+replay"] = [*own, *replay, *common, f"init_from={base}"]
            if n in a.keep_sizes:  # the base's reference energies kept: how much of the forgetting is E0's
                runs["finetune-keepE0"] = [*own, *common, f"init_from={base}", "finetune.reference_energies=keep"]
            for kind, overrides in runs.items():
                model, wall = self.train(f"{family}-rmd17-{kind}-{n}", overrides)
                sets = {**tests, **(old if kind != "scratch" else {})}
                self.record(family=family, experiment="rmd17", kind=kind, frames=n, steps=steps, wall_s=wall,
                            test=self.evaluate(model, sets))

    def emt(self, family: str) -> None:
        from potentials.datasets import emt

        a = self.args
        old = emt.generate(seed=98, n_structures=a.emt_test_frames)
        new = emt.generate(seed=99, n_structures=a.emt_test_frames, elements=EMT_NEW)
        tests = {"CuAgAu": old, "CuNi": new}
        val = 20
        base, wall = self.train(f"{family}-emt-base", [
            *FAMILIES[family], "data=emt", f"data.source.n_structures={a.emt_base_frames + val}",
            "data.source.seed=5", f"data.split.val={val}", "data.split.test=0", "data.batch_size=4",
            f"trainer.max_steps={self.steps(a.emt_base_steps)}"])
        self.record(family=family, experiment="emt", kind="base", frames=a.emt_base_frames,
                    steps=self.steps(a.emt_base_steps), wall_s=wall, test=self.evaluate(base, {"CuAgAu": old}))
        steps = self.steps(a.emt_steps)
        for n in a.emt_sizes:
            data = ["data=emt", f"data.source.n_structures={n + val}", "data.source.seed=21",
                    f"+data.source.elements=[{','.join(EMT_NEW)}]", f"data.split.val={val}", "data.split.test=0",
                    "data.batch_size=4", f"trainer.max_steps={steps}"]
            for seed in range(a.emt_seeds):  # the same frames; the seed changes initialisation and batch order
                tag = "" if seed == 0 else f"-s{seed}"
                for kind, overrides in {"scratch": [*FAMILIES[family], *data],
                                        "finetune": [*data, f"init_from={base}"]}.items():
                    model, wall = self.train(f"{family}-emt-{kind}-{n}{tag}", [*overrides, f"seed={seed}"])
                    sets = tests if kind == "finetune" else {"CuNi": new}
                    self.record(family=family, experiment="emt", kind=kind, frames=n, steps=steps, wall_s=wall,
                                seed=seed, test=self.evaluate(model, sets))


# ----------------------------------------------------------------------------------------------- report


def _get(records: list[dict], **match) -> dict | None:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items())), None)


def curves_table(records: list[dict], target: str) -> str:
    headers = ["family", "frames", "steps", "scratch F", "fine-tuned F", "+replay F", "scratch E", "fine-tuned E",
               "+replay E", "scratch / fine-tuned (F)", "wall s (scratch / ft / +replay)"]
    rows = []
    for fam in sorted({r["family"] for r in records if r["experiment"] == "rmd17"}):
        for n in sorted({r["frames"] for r in records if r["experiment"] == "rmd17" and r["kind"] == "scratch"}):
            got = {k: _get(records, family=fam, experiment="rmd17", kind=k, frames=n)
                   for k in ("scratch", "finetune", "finetune+replay")}
            t = {k: (r["test"][target] if r else {}) for k, r in got.items()}
            ratio = (t["scratch"]["force_mae"] / t["finetune"]["force_mae"]
                     if t["scratch"] and t["finetune"] else None)
            walls = " / ".join(f"{got[k]['wall_s']:.0f}" if got[k] else "–" for k in got)
            rows.append([fam, n, got["scratch"]["steps"] if got["scratch"] else None,
                         *[t[k].get("force_mae") for k in got], *[t[k].get("energy_mae") for k in got], ratio, walls])
    return report.markdown_table(headers, rows)


def forgetting_table(records: list[dict], pretrain: list[str]) -> str:
    """Mean and worst error over the pretraining molecules, per model, and their ratios to the base's."""
    headers = ["family", "model", "frames", "mean F", "mean E", "mean F / base", "worst F / base (molecule)",
               "worst E / base (molecule)"]
    rows = []
    for r in records:
        if r["experiment"] != "rmd17" or r["kind"] == "scratch" or not all(m in r["test"] for m in pretrain):
            continue
        base = _get(records, family=r["family"], experiment="rmd17", kind="base")["test"]
        fs = {m: r["test"][m]["force_mae"] / base[m]["force_mae"] for m in pretrain}
        es = {m: r["test"][m]["energy_mae"] / base[m]["energy_mae"] for m in pretrain}
        mean_f = float(np.mean([r["test"][m]["force_mae"] for m in pretrain]))
        wf, we = max(fs, key=fs.get), max(es, key=es.get)
        rows.append([r["family"], r["kind"], r["frames"], mean_f,
                     float(np.mean([r["test"][m]["energy_mae"] for m in pretrain])),
                     mean_f / float(np.mean([base[m]["force_mae"] for m in pretrain])),
                     f"{fs[wf]:.2f} ({wf})", f"{es[we]:.1f} ({we})"])
    return report.markdown_table(headers, rows)


def forgetting_detail(records: list[dict], pretrain: list[str], target: str) -> str:
    """Force / energy MAE on each pretraining molecule and on the target, per model."""
    headers = ["family", "model", "frames", *pretrain, target]
    cell = lambda t, m: f"{t[m]['force_mae']:.1f} / {t[m]['energy_mae']:.1f}" if m in t else ""  # noqa: E731
    rows = [[r["family"], r["kind"], r["frames"], *[cell(r["test"], m) for m in [*pretrain, target]]]
            for r in records if r["experiment"] == "rmd17" and r["kind"] != "scratch"]
    return report.markdown_table(headers, rows)


def _emt_groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """EMT records by (family, kind, frames), the seeds of each together, in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["experiment"] == "emt":
            groups.setdefault((r["family"], r["kind"], r["frames"]), []).append(r)
    return groups


def _emt_mean(runs: list[dict], test: str, metric: str) -> float | None:
    values = [r["test"][test][metric] for r in runs if test in r["test"]]
    return float(np.mean(values)) if values else None


def emt_table(records: list[dict]) -> str:
    """Mean over seeds (± their standard deviation where there are several) of each EMT model's errors."""
    headers = ["family", "model", "frames", "steps", "seeds", "CuNi F", "CuNi E", "CuAgAu F", "CuAgAu E",
               "wall s (mean)"]
    rows = []
    for (family, kind, frames), runs in _emt_groups(records).items():
        cells = []
        for test in ("CuNi", "CuAgAu"):
            for metric in ("force_mae", "energy_mae"):
                values = [r["test"][test][metric] for r in runs if test in r["test"]]
                cells.append("" if not values else f"{np.mean(values):.3g}" if len(values) == 1
                             else f"{np.mean(values):.3g} ± {np.std(values, ddof=1):.2g}")
        rows.append([family, kind, frames, runs[0]["steps"], len(runs), *cells,
                     float(np.mean([r["wall_s"] for r in runs]))])
    return report.markdown_table(headers, rows)


def not_better(records: list[dict], target: str) -> list[str]:
    """Every size (and set) where a fine-tuned model (with or without replay) is not ahead of scratch, with the
    margin (EMT: seed means against seed means)."""
    out = []
    for r in records:
        if r["experiment"] != "rmd17" or r["kind"] not in ("finetune", "finetune+replay"):
            continue
        s = _get(records, family=r["family"], experiment=r["experiment"], kind="scratch", frames=r["frames"])
        if s is None:
            continue
        for metric, unit in (("force_mae", "meV/Å"), ("energy_mae", "meV/atom")):
            ft, sc = r["test"][target][metric], s["test"][target][metric]
            if ft >= sc:
                out.append(f"{r['family']} {r['experiment']} {r['frames']} frames, {metric}: {r['kind']} {ft:.2f} "
                           f"{unit} against scratch {sc:.2f} ({100 * (ft / sc - 1):+.0f} %)")
    groups = _emt_groups(records)
    for (family, kind, frames), runs in groups.items():
        scratch = groups.get((family, "scratch", frames))
        if kind != "finetune" or not scratch:
            continue
        for metric, unit in (("force_mae", "meV/Å"), ("energy_mae", "meV/atom")):
            ft, sc = _emt_mean(runs, "CuNi", metric), _emt_mean(scratch, "CuNi", metric)
            if ft >= sc:
                out.append(f"{family} emt {frames} frames, {metric} (mean of {len(runs)} seeds): {kind} {ft:.2f} "
                           f"{unit} against scratch {sc:.2f} ({100 * (ft / sc - 1):+.0f} %)")
    return out


def plot(records: list[dict], target: str, path: Path) -> None:
    plt = report.plt
    fams = sorted({r["family"] for r in records if r["experiment"] == "rmd17"})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"scratch": ("o-C0", "from scratch"), "finetune": ("s-C1", "fine-tuned"),
              "finetune+replay": ("^--C2", "fine-tuned + replay")}
    for fam in fams:
        for kind, (style, label) in styles.items():
            pts = sorted((r["frames"], r["test"][target]) for r in records
                         if r["experiment"] == "rmd17" and r["family"] == fam and r["kind"] == kind)
            if not pts:
                continue
            x = [p[0] for p in pts]
            axes[0].plot(x, [p[1]["force_mae"] for p in pts], style, label=f"{fam} {label}")
            axes[1].plot(x, [p[1]["energy_mae"] for p in pts], style, label=f"{fam} {label}")
        base = _get(records, family=fam, experiment="rmd17", kind="base")
        if base:
            old = [m for m in base["test"] if m != target]
            for kind, (style, label) in styles.items():
                pts = sorted((r["frames"], np.mean([r["test"][m]["force_mae"] for m in old])) for r in records
                             if r["experiment"] == "rmd17" and r["family"] == fam and r["kind"] == kind
                             and all(m in r["test"] for m in old))
                if pts:
                    axes[2].plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{fam} {label}")
            axes[2].axhline(np.mean([base["test"][m]["force_mae"] for m in old]), color="grey", ls=":",
                            label=f"{fam} base (before fine-tuning)")
    titles = [f"{target} test: force MAE (meV/Å)", f"{target} test: energy MAE (meV/atom)",
              "pretraining molecules' test: mean force MAE (meV/Å)"]
    sizes = sorted({r["frames"] for r in records if r["experiment"] == "rmd17" and r["kind"] == "scratch"})
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel(f"{target} training frames")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data: dict, out: Path) -> Path:
    meta, records = data["meta"], data["records"]
    s = meta["settings"]
    target = s["target"]
    out.mkdir(parents=True, exist_ok=True)
    plot(records, target, out / f"{NAME}.png")
    m0, m1 = meta["machine_start"], meta.get("machine_end", {})
    header = {
        "date": meta["start"].replace("T", " ")[:16],
        "command": meta["command"],
        "machine": f"{m0['host']}: {m0['cpu']}, {m0['cores']} cores, {m0['memory_GB']} GB, {m0['platform']}",
        "load average (1/5/15 min) at start / end": f"{m0['load_avg_1_5_15']} / {m1.get('load_avg_1_5_15')}",
        "threads": f"{s['threads']} (torch.set_num_threads)",
        "total wall time": f"{meta.get('wall_s', 0) / 60:.1f} min",
        **({"kept from the report it replaced (--merge)": f"{', '.join(meta['merged'])}, measured by: "
            + "; ".join(meta["merged_from"])} if meta.get("merged") else {}),
        "settings": {k: str(v) for k, v in s.items()},
    }
    fails = not_better(records, target)
    verdict = ("Fine-tuning, with and without replay, is ahead of scratch on both force and energy error at every "
               "size measured."
               if not fails else "Where fine-tuning is **not** ahead of scratch:\n\n"
               + "\n".join(f"- {f}" for f in fails))
    sections = [
        (f"Learning curves: rMD17 {target}, equal optimiser steps",
         f"Base pretrained on {', '.join(s['pretrain'])} ({s['pretrain_frames']} train_01 frames each). "
         f"Test: {s['test_frames']} {target} test_01 frames. F: force MAE meV/Å, E: energy MAE meV/atom. "
         f"Fine-tuning at `finetune.lr=1e-3`, scratch at `training.lr=5e-3` (the defaults), batch {BATCH}, "
         f"cosine schedule over the steps; replay draws {s['replay']:.0%} of the batches from the pretraining "
         f"frames.\n\n" + curves_table(records, target) + f"\n\n{verdict}\n\n![curves]({NAME}.png)"),
        ("Forgetting: the pretraining molecules' test error",
         f"{s['forget_frames']} test_01 frames per molecule; force MAE meV/Å / energy MAE meV/atom. "
         "`finetune-keepE0`: fine-tuned with `finetune.reference_energies=keep` (the base's E0).\n\n"
         + forgetting_detail(records, s["pretrain"], target)
         + "\n\n" + forgetting_table(records, s["pretrain"])),
        ("A new element, periodic: EMT Cu/Ag/Au base fine-tuned onto Cu-Ni",
         f"Base: {s['emt_base_frames']} EMT Cu/Ag/Au structures (bulk, vacancies, slabs). Fine-tuning set: EMT "
         f"Cu-Ni structures (Ni new to the base). Test: {s['emt_test_frames']} Cu-Ni and {s['emt_test_frames']} "
         "Cu/Ag/Au structures generated with other seeds; CuAgAu after fine-tuning measures forgetting.\n\n"
         + emt_table(records)),
    ]
    return report.write_markdown(out / f"{NAME}.md", header, sections, title="Benchmark results: fine-tuning")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["egnn"], choices=sorted(FAMILIES))
    p.add_argument("--target", default="paracetamol", help="the held-out rMD17 molecule")
    p.add_argument("--pretrain", nargs="+", default=["ethanol", "malonaldehyde", "uracil", "salicylic", "aspirin"])
    p.add_argument("--pretrain-frames", type=int, default=200, help="train_01 frames per pretraining molecule")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--steps", type=int, default=600, help="optimiser steps of every fine-tuning and scratch run")
    p.add_argument("--replay", type=float, default=0.25, help="share of the batches drawn from the pretraining data")
    p.add_argument("--replay-sizes", type=int, nargs="*", default=[25, 50, 100, 200])
    p.add_argument("--keep-sizes", type=int, nargs="*", default=[100],
                   help="sizes also fine-tuned with finetune.reference_energies=keep")
    p.add_argument("--test-frames", type=int, default=200)
    p.add_argument("--forget-frames", type=int, default=100)
    p.add_argument("--emt-base-frames", type=int, default=300)
    p.add_argument("--emt-base-steps", type=int, default=1500)
    p.add_argument("--emt-sizes", type=int, nargs="+", default=[25, 100])
    p.add_argument("--emt-steps", type=int, default=400)
    p.add_argument("--emt-test-frames", type=int, default=100)
    p.add_argument("--emt-seeds", type=int, default=3, help="training seeds of every EMT scratch and fine-tuning "
                                                           "run (the report gives their mean and spread)")
    p.add_argument("--no-emt", action="store_true", help="leave out the periodic experiment")
    p.add_argument("--experiments", nargs="+", default=["rmd17", "emt"], choices=["rmd17", "emt"])
    p.add_argument("--merge", action="store_true",
                   help="keep the records of the report being replaced (--out/finetune.json) for the (family, "
                        "experiment) pairs this run does not measure, so one family or one experiment can be "
                        "rerun alone")
    p.add_argument("--budget", type=float, default=1.0, help="multiplies every step count")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(CACHE_DIR / "finetune"))
    p.add_argument("--reuse", action="store_true", help="keep finished runs found in --workdir")
    p.add_argument("--out", default=str(report.RESULTS_DIR))
    p.add_argument("--report", metavar="JSON", help="only re-render finetune.md/.png from a saved finetune.json")
    return p


def merge_records(old: list[dict], new: list[dict]) -> tuple[list[dict], list[str]]:
    """``old`` records of the (family, experiment) pairs ``new`` does not measure, then ``new``; and the names of
    the pairs kept."""
    measured = {(r["family"], r["experiment"]) for r in new}
    kept = [r for r in old if (r["family"], r["experiment"]) not in measured]
    return kept + new, sorted({f"{r['family']} {r['experiment']}" for r in kept})


def main(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    if args.report:
        return write(json.loads(Path(args.report).read_text()), Path(args.out))
    if args.target in args.pretrain:
        raise SystemExit(f"--target {args.target} is also a pretraining molecule")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = dt.datetime.now()
    t0 = time.perf_counter()
    meta = {"start": start.isoformat(timespec="seconds"), "machine_start": report.machine_info(),
            "command": "python -m benchmarks.finetune_curves "
                       + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out", "reuse", "report")}}
    exp = Experiment(args)
    out = Path(args.out)
    experiments = [e for e in args.experiments if not (e == "emt" and args.no_emt)]
    for family in args.families:
        if "rmd17" in experiments:
            exp.rmd17(family)
        if "emt" in experiments:
            exp.emt(family)
    meta["machine_end"] = report.machine_info()
    meta["wall_s"] = time.perf_counter() - t0
    records = exp.records
    if args.merge and (out / f"{NAME}.json").is_file():
        old = json.loads((out / f"{NAME}.json").read_text())
        records, kept = merge_records(old["records"], records)
        meta["merged"] = kept
        meta["merged_from"] = [old["meta"]["command"], *old["meta"].get("merged_from", [])]
        meta["settings"]["families"] = sorted({r["family"] for r in records})
    data = {"meta": meta, "records": records}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(data, indent=1, default=str))
    md = write(data, out)
    _say(f"wrote {md}")
    return md


if __name__ == "__main__":
    main()
