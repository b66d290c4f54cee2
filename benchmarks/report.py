"""Markdown tables and matplotlib figures for a benchmark run.

A record is ``{"label": str, "framework": str, "result": dict}`` (a worker's JSON) or
``{"label", "framework", "error": str}``. Tables show throughput and, where the reference model ran on the
same structure and dtype, the ratio to it (> 1 means faster than the reference).
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """Host name, CPU model, core count, memory and current load average."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        mem_gb = float("nan")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "memory_GB": round(mem_gb, 1),
            "platform": platform.platform(), "load_avg_1_5_15": [round(x, 2) for x in load]}


def fmt(value) -> str:
    """Numbers with 3 significant digits (no exponent below 1e6); other values as str."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _errors(records: list[dict]) -> str:
    bad = [r for r in records if "error" in r]
    if not bad:
        return ""
    items = "\n".join(f"- {r['label']} ({r['framework']}): {r['error'].splitlines()[0][:300]}" for r in bad)
    return "\n\nNot measured:\n" + items


def _rows(records: list[dict]):
    for rec in records:
        if "result" in rec:
            for entry in rec["result"]["results"]:
                yield rec, entry


def merge_rounds(records: list[dict]) -> list[dict]:
    """One record per (model, dtype) from the inference records of several rounds.

    Per structure: the median over rounds of each round's median step time (and the rates from it), the least
    single step time, and the rounds' medians themselves (``round_model_ms``); a single round passes unchanged.
    """
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        if "result" in rec:
            groups.setdefault((rec["label"], rec["framework"], rec["result"]["dtype"]), []).append(rec)
    merged = [rec for rec in records if "error" in rec]
    for recs in groups.values():
        if len(recs) == 1:
            merged.append(recs[0])
            continue
        entries: dict[str, list[dict]] = {}
        for rec in recs:
            for e in rec["result"]["results"]:
                entries.setdefault(e["structure"], []).append(e)
        results = []
        for es in entries.values():
            model_ms = statistics.median(e["model_ms"] for e in es)
            total_ms = statistics.median(e["total_ms"] for e in es)
            n = es[0]["n_atoms"]
            results.append({**es[0], "model_ms": model_ms, "total_ms": total_ms,
                            "graph_ms": statistics.median(e["graph_ms"] for e in es),
                            "model_ms_min": min(e.get("model_ms_min", e["model_ms"]) for e in es),
                            "steps_per_s": 1e3 / model_ms, "atom_steps_per_s": 1e3 * n / model_ms,
                            "steps_per_s_with_graph": 1e3 / total_ms, "atom_steps_per_s_with_graph": 1e3 * n / total_ms,
                            "round_model_ms": [e["model_ms"] for e in es]})
        merged.append({**recs[0], "result": {**recs[0]["result"], "results": results}, "rounds": len(recs)})
    return merged


def infer_table(records: list[dict], reference: str = "mace-64") -> str:
    """Energy + forces + stress per step, model alone and with graph building (medians over rounds, if several)."""
    records = merge_rounds(records)
    ref = {(e["structure"], r["result"]["dtype"]): e["atom_steps_per_s"]
           for r, e in _rows(records) if r["label"] == reference}
    rounds = any("rounds" in r for r in records)
    headers = ["model", "framework", "params", "dtype", "structure", "atoms", "edges", "model ms", "min ms", "steps/s",
               "atom-steps/s", "graph ms", "steps/s incl. graph", "atom-steps/s incl. graph", f"× {reference}"]
    headers += ["model ms of each round"] if rounds else []
    rows = []
    for rec, e in _rows(records):
        res = rec["result"]
        r = ref.get((e["structure"], res["dtype"]))
        row = [rec["label"], rec["framework"], res["model"].get("n_params"), res["dtype"], e["structure"],
               e["n_atoms"], e["n_edges"], e["model_ms"], e.get("model_ms_min"), e["steps_per_s"],
               e["atom_steps_per_s"], e["graph_ms"], e["steps_per_s_with_graph"],
               e["atom_steps_per_s_with_graph"], e["atom_steps_per_s"] / r if r else None]
        if rounds:
            row.append(", ".join(fmt(v) for v in e.get("round_model_ms", [e["model_ms"]])))
        rows.append(row)
    return markdown_table(headers, rows) + _errors(records)


def paired_ratios_table(records: list[dict], references: tuple[str, ...] = ("mace-64", "escn-md-64-l2")) -> str:
    """Each model's speed over a reference's measured in the same round (reference ms / model ms), per round and
    their median; empty unless some model and reference share two or more rounds.

    Where the machine's speed drifts over minutes, a ratio of two measurements taken close together is steadier
    than the ratio of two medians taken over different rounds.
    """
    times: dict[tuple, dict[int, float]] = {}
    for rec, e in _rows(records):
        key = (rec["label"], rec["result"]["dtype"], e["structure"])
        times.setdefault(key, {})[rec.get("round", 0)] = e["model_ms"]
    rows = []
    for (label, dtype, structure), by_round in times.items():
        for ref in references:
            ref_rounds = times.get((ref, dtype, structure))
            common = sorted(set(by_round) & set(ref_rounds or {}))
            if ref == label or len(common) < 2:
                continue
            ratios = [ref_rounds[i] / by_round[i] for i in common]
            rows.append([label, dtype, structure, ref, ", ".join(fmt(r) for r in ratios), statistics.median(ratios)])
    if not rows:
        return ""
    return markdown_table(["model", "dtype", "structure", "× reference", "each round", "median"], rows)


def train_table(records: list[dict], reference: str = "mace-64") -> str:
    """One optimiser step (forces in the loss) per batch; graphs prebuilt."""
    ref = {(e["structure"], r["result"]["dtype"]): e["structures_per_s"]
           for r, e in _rows(records) if r["label"] == reference}
    headers = ["model", "framework", "params", "dtype", "batch", "batch size", "atoms/batch", "step ms",
               "structures/s", "atoms/s", f"× {reference}"]
    rows = []
    for rec, e in _rows(records):
        res = rec["result"]
        r = ref.get((e["structure"], res["dtype"]))
        rows.append([rec["label"], rec["framework"], res["model"].get("n_params"), res["dtype"], e["structure"],
                     e["batch_size"], e["atoms_per_batch"], e["step_ms"], e["structures_per_s"], e["atoms_per_s"],
                     e["structures_per_s"] / r if r else None])
    return markdown_table(headers, rows) + _errors(records)


def accuracy_table(records: list[dict]) -> str:
    """Test errors after training for the same wall-clock budget."""
    headers = ["model", "framework", "params", "dtype", "lr", "budget s", "steps", "epochs", "train/val/test",
               "test E MAE meV", "test F MAE meV/Å"]
    rows = []
    for rec in records:
        if "result" not in rec:
            continue
        r = rec["result"]
        rows.append([rec["label"], rec["framework"], r["model"].get("n_params"), r["dtype"], r.get("lr"), r["budget_s"],
                     r["steps"], r["epochs"], f"{r['n_train']}/{r['n_val']}/{r['n_test']}",
                     r["test_e_mae_meV"], r["test_f_mae_meV_A"]])
    return markdown_table(headers, rows) + _errors(records)


def neighbors_table(rows: list[dict]) -> str:
    """Milliseconds per full neighbour list, one column per builder."""
    if not rows:
        return "(no rows)"
    names = [k[:-3] for k in rows[0] if k.endswith("_ms")]
    headers = ["atoms", "edges", *[f"{n} ms" for n in names], *[f"{n} time / ours time" for n in names if n != "ours"]]
    body = [[r["n_atoms"], r["n_edges"], *[r[f"{n}_ms"] for n in names],
             *[r[f"{n}_ms"] / r["ours_ms"] for n in names if n != "ours"]] for r in rows]
    return markdown_table(headers, body)


def plot_throughput(records: list[dict], path: Path, key: str = "atom_steps_per_s") -> Path:
    """Grouped bars: one group per (structure, dtype), one bar per model; log scale."""
    records = merge_rounds(records)
    groups = sorted({(e["structure"], r["result"]["dtype"]) for r, e in _rows(records)})
    labels = list(dict.fromkeys(r["label"] for r, _ in _rows(records)))
    values = {(r["label"], e["structure"], r["result"]["dtype"]): e[key] for r, e in _rows(records)}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(labels)) / 2), 4))
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        xs = [g + (k - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((label, s, d), 0.0) for s, d in groups]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(groups)), [f"{s}\n{d}" for s, d in groups])
    ax.set_yscale("log")
    ax.set_ylabel(key.replace("_", " ").replace("per s", "/ s"))
    ax.set_title("Inference throughput (E+F+S), higher is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _loglog(path: Path, lines: list[tuple[str, list, list]], xlabel: str, ylabel: str, title: str = "") -> Path:
    """One log-log figure with a marked line per (label, xs, ys)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(records: list[dict], path: Path, key: str = "test_f_mae_meV_A") -> Path:
    """Force MAE against training seconds, one line per model; log-log."""
    lines = [(rec["label"], [c["elapsed_s"] for c in rec["result"]["curve"]], [c[key] for c in rec["result"]["curve"]])
             for rec in records if "result" in rec]
    return _loglog(path, lines, "training time, s (optimiser steps only)", "test force MAE, meV/Å",
                   "MD17 ethanol: accuracy at equal time")


def plot_neighbors(rows: list[dict], path: Path) -> Path:
    """Neighbour-list milliseconds against atoms, log-log."""
    names = [k[:-3] for k in rows[0] if k.endswith("_ms")]
    lines = [(name, [r["n_atoms"] for r in rows], [r[f"{name}_ms"] for r in rows]) for name in names]
    return _loglog(path, lines, "atoms (Cu fcc, cutoff 5 Å)", "ms per neighbour list")


def report_name(part: str, dtypes=("float32",), variant: str = "") -> str:
    """The fixed file name (without suffix) of a part's report: each run replaces the previous report of its part.

    Inference measured in float64 alone is not comparable with the float32 figures, so it keeps its own report.
    ``variant`` (``--report-variant``) names a side report, ``<part>-<variant>``, for a run over a subset of models
    that must not replace the part's main report.
    """
    name = "infer-float64" if part == "infer" and tuple(dtypes) == ("float64",) else part
    return f"{name}-{variant}" if variant else name


def write_markdown(path: Path, header: dict, sections: list[tuple[str, str]],
                   title: str = "Benchmark results") -> Path:
    """The report: a header of run facts (versions, threads, command, date, machine), then the sections."""
    lines = [f"# {title}", ""]
    for key, value in header.items():
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            lines.append(f"- **{key}**:")
            lines += [f"  - {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"- **{key}**: {value if not isinstance(value, dict) else _inline(value)}")
    for title, body in sections:
        lines += ["", f"## {title}", "", body]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _inline(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def _interp_loglog(xs: list[float], ys: list[float], x: float) -> float:
    """``ys`` at ``x``, linear in log-log between the points, held constant beyond the ends."""
    import math

    pts = [(a, b) for a, b in zip(xs, ys, strict=True) if a > 0 and b > 0]
    if not pts:
        return float("nan")
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 1.0
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    return pts[-1][1]


def equal_time_ratios(records: list[dict], marks: list[float], key: str = "test_f_mae_meV_A") -> list[list]:
    """For each non-MACE record: its ``key`` divided by MACE's at each time of ``marks`` (both curves interpolated
    in log-log; < 1 means more accurate than MACE after the same training time)."""
    ok = [r for r in records if "result" in r and r["result"].get("curve")]
    ref = next((r for r in ok if r["framework"] == "mace"), None)
    if ref is None:
        return []
    curve = ref["result"]["curve"]
    rx, ry = [c["elapsed_s"] for c in curve], [c[key] for c in curve]
    rows = []
    for rec in ok:
        if rec is ref:
            continue
        cx = [c["elapsed_s"] for c in rec["result"]["curve"]]
        cy = [c[key] for c in rec["result"]["curve"]]
        rows.append([rec["label"], rec["framework"], ref["label"],
                     *[_interp_loglog(cx, cy, m) / _interp_loglog(rx, ry, m) for m in marks]])
    return rows


def _set_metric(point: dict, test: str, key: str):
    return point.get("sets", {}).get(test, {}).get(key)


def dataset_table(records: list[dict]) -> str:
    """One data set's test errors after the same training budget, one row per model, the published value below."""
    first = records[0]
    tests, stress, per_atom = first["tests"], first["stress"], first["per_atom_energy"]
    e_key, e_unit = ("e_mae_meV_atom", "meV/atom") if per_atom else ("e_mae_meV", "meV")
    headers = ["model", "framework", "params", "lr", "steps", "epochs", "val F MAE meV/Å"]
    for t in tests:
        prefix = "" if len(tests) == 1 else f"{t} "
        headers += [f"{prefix}E MAE {e_unit}", f"{prefix}F MAE meV/Å"] + ([f"{prefix}S MAE meV/Å³"] if stress else [])
    rows = []
    for rec in records:
        if "result" not in rec:
            continue
        r = rec["result"]
        last = r["curve"][-1]
        row = [rec["label"], rec["framework"], r["model"].get("n_params"), r.get("lr"), r["steps"], r["epochs"],
               last.get("val_f_mae_meV_A")]
        for t in tests:
            row += [_set_metric(last, t, e_key), _set_metric(last, t, "f_mae_meV_A")]
            if stress:
                row.append(_set_metric(last, t, "s_mae_meV_A3"))
        rows.append(row)
    from benchmarks.datasets import PUBLISHED_SOURCE, published_force_mae

    published = published_force_mae(first["dataset"])
    if published is not None:
        lead = ["MACE, published", PUBLISHED_SOURCE] + [None] * 6  # up to the first test set's energy
        rows.append(lead + [published] + [None] * (len(headers) - len(lead) - 1))
    sizes = ", ".join(f"{k} {v}" for k, v in first["sizes"].items())
    notes = first.get("notes", {})
    facts = f"Frames: {sizes}. Source: {notes.get('source', '?')}."
    if notes.get("held_out_groups"):
        facts += f" Test groups (config_type, held out of training): {', '.join(notes['held_out_groups'])}."
    return facts + "\n\n" + markdown_table(headers, rows) + _errors(records)


def plot_dataset_curves(by_set: dict[str, list[dict]], path: Path, key: str = "test_f_mae_meV_A") -> Path:
    """Test force MAE (first test set) against training seconds, one panel per data set, log-log."""
    n = max(1, len(by_set))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, recs) in zip(axes.flat, by_set.items(), strict=False):
        for rec in recs:
            if "result" in rec:
                curve = rec["result"]["curve"]
                ax.plot([c["elapsed_s"] for c in curve], [c[key] for c in curve], marker="o", label=rec["label"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name} ({recs[0]['tests'][0]})", fontsize=10)
        ax.set_xlabel("training time, s (optimiser steps only)")
        ax.set_ylabel("test force MAE, meV/Å")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Facet's accuracy targets at equal time: its test force MAE at most this multiple of MACE's on these sets.
FACET_TARGETS = {"rmd17-aspirin": 0.8, "ta-random": 0.8}


def targets_table(by_set: dict[str, list[dict]], pending: dict[str, list[str]] | None = None) -> str:
    """The accuracy targets, judged on the final test force MAE (first test set) of every set with a MACE cell:
    the best of this project's models at most MACE's, and Facet within :data:`FACET_TARGETS`. Empty if none.

    ``pending``: per set, the planned model labels without a result yet; a verdict on a set that still misses
    one is marked provisional, naming the models still to come."""
    rows = []
    pending = pending or {}
    for dataset, recs in by_set.items():
        final = {r["label"]: (r["framework"], r["result"]["curve"][-1]["test_f_mae_meV_A"])
                 for r in recs if "result" in r and r["result"].get("curve")}
        mace = next((v for fw, v in final.values() if fw == "mace"), None)
        if not mace:
            continue
        ours = {label: v for label, (fw, v) in final.items() if fw == "ours"}
        checks = [("best model here ≤ MACE", ours, 1.0)]
        if dataset in FACET_TARGETS:
            checks.append((f"Facet ≤ {FACET_TARGETS[dataset]:g} × MACE",
                           {k: v for k, v in ours.items() if k.startswith("facet")}, FACET_TARGETS[dataset]))
        for name, models, limit in checks:
            if not models:
                continue
            best = min(models, key=models.get)
            ratio = models[best] / mace
            verdict = "met" if ratio <= limit else f"missed by {ratio / limit - 1:.0%}"
            if pending.get(dataset):
                verdict += f" (so far: {', '.join(pending[dataset])} not measured yet)"
            rows.append([name, dataset, best, models[best], mace, ratio, verdict])
    if not rows:
        return ""
    met = sum(r[-1].startswith("met") for r in rows)
    return (f"{met} of {len(rows)} met. Test force MAE (meV/Å, first test set) after the budget; ratio to MACE's.\n\n"
            + markdown_table(["target", "set", "model", "F MAE", "MACE F MAE", "ratio", "verdict"], rows))


def dataset_sections(records: list[dict], budget_s: float, out: Path, name: str,
                     eval_points: int = 8, pending: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """The accuracy report of a ``--datasets`` run: per data set a table and the ratios to MACE; one figure.
    ``pending``: per set, the planned models without a result yet (see :func:`targets_table`)."""
    import numpy as np

    by_set: dict[str, list[dict]] = {}
    for rec in records:
        by_set.setdefault(rec["dataset"], []).append(rec)
    plot_dataset_curves(by_set, out / f"{name}.png")
    marks = [float(m) for m in np.geomspace(budget_s / 2 ** (eval_points - 1), budget_s, eval_points)]
    sections = []
    for dataset, recs in by_set.items():
        body = dataset_table(recs)
        ratios = equal_time_ratios(recs, marks)
        if ratios:
            body += ("\n\nForce MAE on the first test set divided by MACE's after the same training time (< 1: "
                     "more accurate than MACE at that time):\n\n"
                     + markdown_table(["model", "framework", "reference", *[f"{m:.3g} s" for m in marks]], ratios))
        sections.append((f"{dataset}: accuracy after {budget_s:.0f} s of optimiser steps", body))
    targets = targets_table(by_set, pending)
    if targets:
        sections.insert(0, ("Targets", targets))
    sections.append(("Learning curves", f"![accuracy]({name}.png)"))
    return sections
