"""Command line: ``python -m benchmarks run [--quick] [--only infer,train,accuracy,neighbors,roofline,finetune]``.

``finetune`` (fine-tuning learning curves, :mod:`benchmarks.finetune_curves`, about 30 minutes) runs only when
``--only`` names it; ``python -m benchmarks.finetune_curves`` has its own options (families, sizes, budget).

``python -m benchmarks setup`` only builds the peer venvs (benchmarks/.venvs, cached between runs).
Each part's report goes to a fixed name, ``benchmarks/results/<part>.md`` (+ ``<part>.json`` with every raw
number, + ``<part>.png``), replacing that part's previous report; the run's date and time are inside the report.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import shlex
import sys
import threading
import time
from pathlib import Path

from benchmarks import datasets, neighbors_bench, peers, report, roofline_report, structures, suite

PARTS = ("infer", "train", "accuracy", "neighbors", "roofline")
EXTRA_PARTS = ("finetune",)  # only when --only names them


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _record(framework: str, label: str, request: dict, settings: suite.Settings, timeout: float) -> dict:
    """Run one worker; a failure becomes an ``error`` record so one broken model does not stop the run."""
    log(f"{request['task']:<16} {label} ({framework}, {request.get('dtype')})")
    try:
        if framework == "ours":
            reason = suite.ours_available(request["model"])
            if reason:
                return {"label": label, "framework": framework, "error": f"skipped: {reason}"}
        result = peers.run_worker(framework, request, timeout=timeout,
                                  wait_policy=None if settings.omp_wait_policy == "none" else settings.omp_wait_policy,
                                  malloc=settings.malloc)
        return {"label": label, "framework": framework, "result": result}
    except peers.PeerError as exc:
        log(f"  failed: {str(exc).splitlines()[0]}")
        return {"label": label, "framework": framework, "error": str(exc)}


def _common(settings: suite.Settings, task: str, dtype: str, cfg: dict) -> dict:
    return {"task": task, "dtype": dtype, "threads": settings.threads, "device": settings.device, "model": cfg,
            "seed": 0}


def run_infer(settings: suite.Settings, paths: dict[str, Path]) -> list[dict]:
    """Every model in a fresh worker; with ``rounds`` > 1 the whole list again, in reverse order every other
    round, so that a slow spell of a shared machine falls on different models (the report takes medians)."""
    entries = [{"name": n, "path": str(paths[n])} for n in settings.infer_structures]
    models = list(suite.selected_models(settings).items())
    records = []
    for round_index in range(settings.rounds):
        for label, (framework, cfg) in (models if round_index % 2 == 0 else models[::-1]):
            for dtype in settings.dtypes:
                req = {**_common(settings, "infer", dtype, cfg), "structures": entries,
                       "warmup": settings.warmup, "steps": settings.steps}
                records.append({**_record(framework, label, req, settings, timeout=3600), "round": round_index})
    return records


def run_train(settings: suite.Settings, paths: dict[str, Path], splits: dict[str, Path]) -> list[dict]:
    entries = [{"name": "cu500", "path": str(paths["cu500"]), "batch_size": 1},
               {"name": "md17-ethanol", "path": str(splits["train"]), "batch_size": 5}]
    records = []
    for label, (framework, cfg) in suite.selected_models(settings).items():
        req = {**_common(settings, "train_step", "float32", cfg), "structures": entries,
               "warmup": settings.train_warmup, "steps": settings.train_steps}
        records.append(_record(framework, label, req, settings, timeout=3600))
    return records


def _accuracy_models(settings: suite.Settings) -> list[tuple[str, str, dict]]:
    """(label, framework, config) of the models the accuracy part trains: all selected but fairchem's."""
    return [(label, framework, cfg) for label, (framework, cfg) in suite.selected_models(settings).items()
            if framework != "fairchem" and (not settings.accuracy_models or label in settings.accuracy_models)]


def _train_request(settings: suite.Settings, label: str, cfg: dict, framework: str) -> dict:
    """The equal-time request of one model: the shared recipe, the model's own overrides, then (this project's
    models only) ``--recipe``; ``--seed`` for every framework."""
    req = {**_common(settings, "train_equal_time", "float32", cfg), "budget_s": settings.budget_s,
           "batch_size": 5, "eval_points": settings.eval_points, **suite.TRAINING_OVERRIDES.get(label, {})}
    if framework == "ours":
        req.update(settings.recipe)
    req["seed"] = settings.seed
    return req


def run_accuracy(settings: suite.Settings, splits: dict[str, Path]) -> list[dict]:
    """MACE, nequip and our models trained on MD17 ethanol for the same wall-clock budget (fairchem not included)."""
    records = []
    for label, framework, cfg in _accuracy_models(settings):
        req = {**_train_request(settings, label, cfg, framework), **{k: str(v) for k, v in splits.items()}}
        records.append(_record(framework, label, req, settings, timeout=settings.budget_s * 3 + 1800))
    return records


def cell_key(dataset: str, label: str, request: dict) -> str:
    """What makes two accuracy cells the same measurement: the data set, the model label and every request field
    but the (cache-folder) file paths, which the data set's name and split seed already fix. ``device`` "cpu" is
    left out, so cells of reports written before requests named a device (all on the CPU) are still taken over."""
    kept = {k: v for k, v in request.items()
            if k not in ("train", "val", "tests") and not (k == "device" and v == "cpu")}
    return json.dumps({"dataset": dataset, "label": label, **kept}, sort_keys=True, default=str)


def run_datasets(settings: suite.Settings, tasks: list[datasets.Task], previous: list[dict] | None = None,
                 save=None) -> list[dict]:
    """Every accuracy model trained on every task of ``--datasets`` for the same budget, one worker each; a record
    carries its task's name, sizes, test-set names, stress flag and split notes.

    ``previous``: records of an earlier run of the same part (``--resume``); a cell whose :func:`cell_key` matches
    a finished record there is taken over instead of trained again, so a run of many hours can be done in pieces.
    ``save(records)`` is called after every cell, so an interrupted run loses at most the cells it was training.
    ``settings.jobs`` cells train at once (each worker with ``settings.threads`` threads); records keep the
    planned order whatever order the cells finish in."""
    done = {rec["cell_key"]: rec for rec in previous or () if "cell_key" in rec and "result" in rec}
    cells = []
    for task in tasks:
        paths = datasets.write_task(task, structures.CACHE_DIR)
        log(f"data set {task.name}: {paths['sizes']} {paths['notes'].get('held_out_groups', '')}")
        info = {"dataset": task.name, "sizes": paths["sizes"], "tests": list(task.tests), "stress": task.stress,
                "per_atom_energy": task.per_atom_energy, "notes": paths["notes"]}
        for label, framework, cfg in _accuracy_models(settings):
            req = {**_train_request(settings, label, cfg, framework), "train": paths["train"], "val": paths["val"],
                   "tests": paths["tests"], "stress": task.stress}
            cells.append((task.name, label, framework, req, info, cell_key(task.name, label, req)))
    results: list[dict | None] = [None] * len(cells)
    lock = threading.Lock()

    def finish(index: int, rec: dict) -> None:
        with lock:
            results[index] = rec
            if save is not None:
                save([r for r in results if r is not None])

    def train(index: int) -> None:
        _, label, framework, req, info, key = cells[index]
        rec = _record(framework, label, req, settings, timeout=settings.budget_s * 3 + 1800)
        finish(index, {**rec, **info, "cell_key": key, "finished": dt.datetime.now().isoformat(timespec="seconds"),
                       "load_avg_end": report.machine_info()["load_avg_1_5_15"]})

    todo = []
    for index, (name, label, framework, _, _, key) in enumerate(cells):
        if key in done:
            log(f"train_equal_time {label} on {name}: taken from the earlier run ({done[key].get('finished', '?')})")
            finish(index, done[key])
        else:
            todo.append(index)
    jobs = max(1, int(settings.jobs))
    if jobs == 1:
        for index in todo:
            train(index)
    else:
        for framework in dict.fromkeys(cells[i][2] for i in todo):
            if framework != "ours":
                peers.ensure_venv(framework)  # built once, before workers start side by side
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for future in [pool.submit(train, index) for index in todo]:
                future.result()
    return [r for r in results if r is not None]


def run_roofline(settings: suite.Settings, paths: dict[str, Path]) -> dict:
    """This project's models: counted work, time and profile of one inference and one training step per structure,
    between two measurements of the machine's roofs (GEMM peak, memory bandwidth) at the same thread count."""
    entries = [{"name": n, "path": str(paths[n])} for n in settings.roofline_structures]

    def roofs() -> dict:
        log("roofs             GEMM peak and memory bandwidth (ours)")
        try:
            policy = None if settings.omp_wait_policy == "none" else settings.omp_wait_policy
            return peers.run_worker("ours", {"task": "roofs", "threads": settings.threads, "device": settings.device},
                                    timeout=600, wait_policy=policy, malloc=settings.malloc)
        except peers.PeerError as exc:
            return {"error": str(exc)}

    out: dict = {"roofs": [roofs()], "models": []}
    for label, cfg in suite.roofline_models(settings).items():
        req = {**_common(settings, "roofline", "float32", cfg), "structures": entries,
               "warmup": 1, "steps": settings.roofline_steps, "profile_calls": 1}
        out["models"].append(_record("ours", label, req, settings, timeout=3600))
    out["roofs"].append(roofs())
    return out


def _results(records: dict):
    """(framework, result) of every measured record of every part."""
    for recs in records.values():
        if isinstance(recs, dict):  # the roofline part: its model records
            recs = recs.get("models", [])
        if not isinstance(recs, list):
            continue
        for rec in recs:
            if isinstance(rec, dict) and isinstance(rec.get("result"), dict) and "framework" in rec:
                yield rec["framework"], rec["result"]


def _versions(records: dict) -> dict:
    out = {}
    for framework, res in _results(records):
        if "versions" in res:
            out.setdefault(framework, ", ".join(f"{k} {x}" for k, x in res["versions"].items()))
    return out


def _devices(records: dict) -> dict:
    """Framework → the device(s) its results were measured on, as the workers recorded them ("cpu" for results
    written before workers recorded a device)."""
    out: dict[str, list[str]] = {}
    for framework, res in _results(records):
        device = res.get("device", "cpu")
        if device not in out.setdefault(framework, []):
            out[framework].append(device)
    return {framework: ", ".join(devices) for framework, devices in out.items()}


def run(args: argparse.Namespace) -> list[Path]:
    only = tuple(args.only.split(",")) if args.only else PARTS
    bad = [p for p in only if p not in PARTS + EXTRA_PARTS]
    if bad:
        raise SystemExit(f"--only: unknown part(s) {bad}; choose from {','.join(PARTS + EXTRA_PARTS)}")
    written = []
    if "finetune" in only:
        from benchmarks import finetune_curves

        log("finetune")
        written.append(finetune_curves.main(["--threads", str(args.threads), "--out", str(args.out)]))
        only = tuple(p for p in only if p != "finetune")
        if not only:
            return written
    settings = suite.Settings.make(
        args.quick, threads=args.threads, device=args.device, budget_s=args.budget,
        dtypes=tuple(args.dtypes.split(",")) if args.dtypes else None,
        infer_structures=tuple(args.structures.split(",")) if args.structures else None,
        roofline_structures=tuple(args.structures.split(",")) if args.structures else None,
        frameworks=tuple(args.frameworks.split(",")) if args.frameworks else None,
        models=tuple(args.models.split(",")) if args.models else None,
        accuracy_models=tuple(args.accuracy_models.split(",")) if args.accuracy_models else None,
        omp_wait_policy=args.omp_wait, malloc=args.malloc, rounds=args.rounds, datasets=args.datasets,
        eval_points=args.eval_points, report_variant=args.report_variant, jobs=args.jobs,
        recipe=suite.parse_recipe(args.recipe) if args.recipe else None, seed=args.seed)
    tasks = datasets.parse_datasets(settings.datasets) if settings.datasets else []
    start = dt.datetime.now()
    meta = {"start": start.isoformat(timespec="seconds"), "machine_start": report.machine_info(),
            "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "settings": vars(settings)}
    log(f"settings: {settings}")
    cache = structures.CACHE_DIR
    names = dict.fromkeys((settings.infer_structures if "infer" in only else ())
                          + (("cu500",) if "train" in only else ())
                          + (settings.roofline_structures if "roofline" in only else ()))
    paths = {n: structures.write_structure(n, cache) for n in names}
    n_train, n_val, n_test = settings.md17_split
    needs_md17 = "train" in only or "accuracy" in only
    splits = structures.write_md17_splits(cache, n_train, n_val, n_test) if needs_md17 else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = save = None
    if tasks and "accuracy" in only:
        accuracy_raw = out / f"{report.report_name('accuracy', settings.dtypes, settings.report_variant)}.json"
        previous = _previous_cells(accuracy_raw, meta) if args.resume else None
        meta["planned_cells"] = [[task.name, label] for task in tasks for label, _, _ in _accuracy_models(settings)]

        def save(records: list[dict]) -> None:
            meta["machine_end"] = report.machine_info()
            accuracy_raw.write_text(json.dumps({"meta": meta, "records": {"accuracy": records}}, indent=1,
                                               default=str))

    steps = {"neighbors": lambda: neighbors_bench.run(), "infer": lambda: run_infer(settings, paths),
             "train": lambda: run_train(settings, paths, splits),
             "accuracy": lambda: (run_datasets(settings, tasks, previous, save) if tasks
                                  else run_accuracy(settings, splits)),
             "roofline": lambda: run_roofline(settings, paths)}
    for part in PARTS:
        if part in only:
            log(part)
            part_data = {"meta": meta, "records": {part: steps[part]()}}
            meta["machine_end"] = report.machine_info()
            # each part's raw numbers and report are written as soon as it ends, so a later failure loses nothing
            raw = out / f"{report.report_name(part, settings.dtypes, settings.report_variant)}.json"
            raw.write_text(json.dumps(part_data, indent=1, default=str))
            written += write(part_data, out)
    return written


def pending_cells(planned: list[list[str]], records: list[dict]) -> list[list[str]]:
    """The planned (set, model) cells without a finished record."""
    done = {(r.get("dataset"), r.get("label")) for r in records if "result" in r}
    return [cell for cell in planned if tuple(cell) not in done]


def _previous_cells(raw: Path, meta: dict) -> list[dict]:
    """The finished cells of the accuracy report at ``raw`` (for ``--resume``); the run's start is carried over
    so that the report dates the whole measurement."""
    if not raw.exists():
        log(f"--resume: no earlier report at {raw}; every cell is trained")
        return []
    old = json.loads(raw.read_text())
    cells = [r for r in old.get("records", {}).get("accuracy", []) if "cell_key" in r and "result" in r]
    meta["resumed_from"] = old["meta"].get("resumed_from") or old["meta"]["start"]
    log(f"--resume: {len(cells)} finished cells in {raw} (run started {meta['resumed_from']})")
    return cells


def write(run_data: dict, out: Path) -> list[Path]:
    """Render ``<part>.md`` and its figure for every part in the raw run data (as saved in ``<part>.json``)."""
    meta, records = run_data["meta"], run_data["records"]
    settings = meta["settings"]
    start = dt.datetime.fromisoformat(meta["start"])
    m0, m1 = meta["machine_start"], meta.get("machine_end", {})
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "date": (start.strftime("%Y-%m-%d %H:%M") if not meta.get("resumed_from") else
                 f"{dt.datetime.fromisoformat(meta['resumed_from']):%Y-%m-%d %H:%M}, continued "
                 f"{start:%Y-%m-%d %H:%M} with --resume (each cell's own finish time and load are in the json)"),
        "command": meta["command"],
        "machine": f"{m0['host']}: {m0['cpu']}, {m0['cores']} cores, {m0['memory_GB']} GB, {m0['platform']}",
        "load average (1/5/15 min) at start / end": f"{m0['load_avg_1_5_15']} / {m1.get('load_avg_1_5_15')}",
        "threads": f"{settings['threads']} (torch.set_num_threads and OMP_NUM_THREADS), "
                   f"OMP_WAIT_POLICY={settings['omp_wait_policy']}, glibc malloc {settings.get('malloc', 'system')} "
                   "(the same for every framework)",
        "versions": _versions(records) or "n/a",
        "devices": _devices(records) or "n/a",
        "settings": {k: v for k, v in settings.items() if k != "models"},
    }
    written = []
    for part in PARTS:
        if part not in records:
            continue
        name = report.report_name(part, settings.get("dtypes", ("float32",)), settings.get("report_variant", ""))
        recs = records[part]
        if part == "infer":
            report.plot_throughput(recs, out / f"{name}.png")
            sections = [("Inference: energy + forces + stress per step",
                         report.infer_table(recs) + f"\n\n![throughput]({name}.png)")]
            paired = report.paired_ratios_table(recs)
            if paired:
                sections.append(("Inference: speed ratios within each round", paired))
        elif part == "train":
            sections = [("Training step (forces in the loss, graphs prebuilt, float32)", report.train_table(recs))]
        elif part == "accuracy" and any("dataset" in r for r in recs):
            pending = pending_cells(meta.get("planned_cells", []), recs)
            by_set: dict[str, list[str]] = {}
            for dataset, label in pending:
                by_set.setdefault(dataset, []).append(label)
            sections = report.dataset_sections(recs, settings["budget_s"], out, name,
                                               settings.get("eval_points", 8), pending=by_set)
            if pending:
                sections.insert(0, ("Cells not measured yet", f"{len(pending)} of {len(meta['planned_cells'])} "
                                    "(set, model) cells of this command have no result yet; rerunning the command "
                                    "with `--resume` trains only these: " + ", ".join(
                                        f"{dataset} × {label}" for dataset, label in pending) + "."))
        elif part == "roofline":
            roofline_report.plot(recs, out / f"{name}.png")
            sections = roofline_report.sections(recs, f"{name}.png")
        elif part == "accuracy":
            report.plot_curves(recs, out / f"{name}.png")
            sections = [(f"Accuracy at equal time: MD17 ethanol, {settings['budget_s']:.0f} s of optimiser steps",
                         report.accuracy_table(recs) + f"\n\n![accuracy]({name}.png)")]
        else:
            report.plot_neighbors(recs, out / f"{name}.png")
            sections = [("Neighbour lists: Cu fcc, cutoff 5 Å, full list with images",
                         report.neighbors_table(recs) + f"\n\n![neighbours]({name}.png)")]
        md = report.write_markdown(out / f"{name}.md", header, sections, title=f"Benchmark results: {part}")
        log(f"wrote {md}")
        written.append(md)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure and write the report")
    r.add_argument("--quick", action="store_true", help="one model per framework, float32, Si64 and Cu500, 60 s")
    r.add_argument("--only", help=f"comma-separated subset of {','.join(PARTS + EXTRA_PARTS)} (default: "
                                  f"{','.join(PARTS)})")
    r.add_argument("--frameworks", help="comma-separated subset of ours,mace,fairchem,nequip")
    r.add_argument("--models", help=f"comma-separated labels from {','.join(suite.all_models())}")
    r.add_argument("--accuracy-models", help="the subset of --models trained for the accuracy part (default: all)")
    r.add_argument("--dtypes", help="comma-separated subset of float32,float64")
    r.add_argument("--structures", help="inference (and roofline) structures, e.g. si64,cu500,ethanol,oc20")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--device", default="cpu", choices=suite.DEVICES,
                   help="torch device of every worker: cpu (default), cuda, or auto (cuda where the worker's torch "
                        "sees a GPU, else cpu); the report lists the device each framework ran on. The roofline "
                        "part measures the CPU only (auto: cpu there; cuda: refused)")
    r.add_argument("--rounds", type=int, help="repeat the inference part this many times, models interleaved; "
                                              "the report gives the median over rounds and their spread")
    r.add_argument("--budget", type=float, help="seconds of training per model (and per data set) for the accuracy "
                                                "part")
    r.add_argument("--datasets", help="real-data sets of the accuracy part instead of MD17 ethanol, e.g. "
                                      "'rmd17:aspirin,ethanol,acac,ta:random,inp' (rmd17, acac, ta, inp, md17-ethanol; "
                                      f"'quick' = {datasets.QUICK_DATASETS})")
    r.add_argument("--eval-points", type=int, help="evaluations per training run, log-spaced in time (default 8)")
    r.add_argument("--omp-wait", default="PASSIVE", help="OMP_WAIT_POLICY for workers (PASSIVE, ACTIVE or none)")
    r.add_argument("--malloc", default="tuned", choices=("tuned", "system"),
                   help="glibc allocator settings of every worker: tuned (freed memory kept for reuse, as "
                        "potentials.accel.allocator sets) or the system defaults")
    r.add_argument("--jobs", type=int, help="accuracy cells trained at once, each worker with --threads threads "
                   "(default 1); keep jobs x threads at most the core count for fair timings")
    r.add_argument("--resume", action="store_true",
                   help="accuracy part with --datasets: keep the finished cells (data set x model, same settings) "
                        "of the report being replaced and train only the others; the report is saved after every "
                        "cell")
    r.add_argument("--recipe", help="accuracy part: change this project's models' equal-time recipe, e.g. "
                   f"lr=3e-3,ema_decay=0.999 (fields: {','.join(suite.RECIPE_FIELDS)}); the peers keep theirs. "
                   "For tuning: judge on the validation column, with --report-variant")
    r.add_argument("--seed", type=int, help="accuracy part: seed of every model's initialisation and batch order "
                                            "(default 0), to measure run-to-run spread")
    r.add_argument("--report-variant", help="write <part>-<variant>.md/.json/.png instead of replacing <part>.md "
                                            "(a side report over a subset of models)")
    r.add_argument("--out", default=str(report.RESULTS_DIR))
    w = sub.add_parser("report", help="re-render the markdown and figures from a saved <part>.json")
    w.add_argument("json")
    w.add_argument("--out", help="folder (default: beside the json)")
    s = sub.add_parser("setup", help="build the peer venvs")
    s.add_argument("peers", nargs="*", default=list(peers.PEERS))
    s.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "report":
        path = Path(args.json)
        write(json.loads(path.read_text()), Path(args.out) if args.out else path.parent)
    elif args.command == "setup":
        for name in args.peers:
            print(json.dumps(peers.ensure_venv(name, force=args.force), indent=2))
    else:
        run(args)


if __name__ == "__main__":
    main()
