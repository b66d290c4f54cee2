"""Tables and the figure of the roofline part (raw data: ``{"roofs": [start, end], "models": [records]}``).

Each model record holds, per structure and step kind, the median step time, the counted work and bytes
(:func:`benchmarks.roofline.count`) and a profile (:func:`benchmarks.roofline.profile_top`).  The roofs are the
best GEMM rate and the best bandwidth measured at the start and at the end of the part.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.report import fmt, markdown_table  # noqa: E402
from benchmarks.roofline import roof  # noqa: E402

STEP_NAMES = {"infer": "infer (E+F+S)", "train": "train (F loss, AdamW)"}
CLASSES = ("gemm", "kernels", "index", "other", "autograd")


def machine_roofs(data: dict) -> tuple[float, float]:
    """(GEMM GFLOP/s, bandwidth GB/s): the best of the part's measurements."""
    ok = [r for r in data["roofs"] if "gemm_gflops" in r]
    if not ok:
        raise ValueError("the roofline run holds no successful measurement of the machine's roofs")
    return max(r["gemm_gflops"] for r in ok), max(r["bandwidth"]["GBs"] for r in ok)


def rows(data: dict):
    """(label, entry, derived numbers) per model, structure and step kind."""
    peak, bw = machine_roofs(data)
    for rec in data["models"]:
        for e in rec.get("result", {}).get("results", []):
            c, seconds = e["counts"], e["min_ms"] / 1e3  # the best step, as the roofs are the best of several
            intensity = c["total"] / c["bytes"] if c["bytes"] else float("nan")
            achieved = c["total"] / seconds / 1e9
            top = roof(intensity, peak, bw)
            yield rec["label"], e, {"achieved": achieved, "peak_share": achieved / peak, "intensity": intensity,
                                    "roof": top, "roof_share": achieved / top}


def roofs_table(data: dict) -> str:
    body = []
    for when, r in zip(("start", "end"), data["roofs"], strict=False):
        if "gemm_gflops" not in r:
            body.append([when, r.get("error", "failed")] + [""] * 6)
            continue
        gemm = ", ".join(f"{g['n']}²: {fmt(g['gflops'])}" for g in r["gemm"])
        narrow = ", ".join("×".join(str(n) for n in g["shape"]) + f": {fmt(g['gflops'])}"
                           for g in r.get("narrow_gemm", []))
        b = r["bandwidth"]
        body.append([when, r["threads"], gemm, r["gemm_gflops"], narrow, b["copy_GBs"], b["add_GBs"],
                     ", ".join(fmt(x) for x in r["load_avg"])])
    return markdown_table(["when", "threads", "float32 GEMM GFLOP/s by size (best of 5)", "GEMM peak GFLOP/s",
                           "model-shaped GEMM (rows×inner×cols) GFLOP/s", "copy GB/s", "add GB/s",
                           "load avg 1/5/15"], body)


def work_table(data: dict) -> str:
    headers = ["model", "structure", "step", "atoms", "edges", "best ms (median)", "GFLOP dense", "GFLOP kernels",
               "GFLOP index", "GFLOP point-wise (est.)", "GFLOP total", "GFLOP/s", "% of GEMM peak", "GB moved (est.)",
               "flop/byte", "roof GFLOP/s", "% of roof", "load 1 min"]
    body = []
    for label, e, d in rows(data):
        c = e["counts"]
        body.append([label, e["structure"], STEP_NAMES.get(e["mode"], e["mode"]), e["n_atoms"], e["n_edges"],
                     f"{fmt(e['min_ms'])} ({fmt(e['median_ms'])})", c["dense"] / 1e9,
                     (c["kernels_mm"] + c["kernels_pointwise"]) / 1e9,
                     c["index"] / 1e9, c["pointwise"] / 1e9, c["total"] / 1e9, d["achieved"],
                     100 * d["peak_share"], c["bytes"] / 1e9, d["intensity"], d["roof"], 100 * d["roof_share"],
                     e["load_avg_before_after"][0][0]])
    return markdown_table(headers, body)


def time_table(data: dict) -> str:
    """Where the time goes, by class of operation (self CPU time in the profile), and the rates within classes."""
    headers = ["model", "structure", "step", "profiled ms (best timed ms)", *[f"% {k}" for k in CLASSES],
               "GEMM-class GFLOP/s", "kernels GFLOP/s", "top operation"]
    body = []
    for label, e, _ in rows(data):
        p, c = e["profile"], e["counts"]
        cls = p["classes"]
        gemm_ms, kern_ms = cls.get("gemm", 0.0), cls.get("kernels", 0.0)
        top = p["ops"][0] if p["ops"] else None
        body.append([label, e["structure"], STEP_NAMES.get(e["mode"], e["mode"]),
                     f"{fmt(p['total_ms'])} ({fmt(e['min_ms'])})",
                     *[100 * cls.get(k, 0.0) / p["total_ms"] for k in CLASSES],
                     c["dense"] / gemm_ms / 1e6 if gemm_ms else None,
                     (c["kernels_mm"] + c["kernels_pointwise"]) / kern_ms / 1e6 if kern_ms else None,
                     f"{top['name']} {100 * top['share']:.0f} %" if top else ""])
    return markdown_table(headers, body)


def profile_tables(data: dict) -> str:
    parts = []
    for label, e, _ in rows(data):
        ops = e["profile"]["ops"]
        table = markdown_table(["operation", "self ms per step", "share", "calls per step"],
                               [[o["name"], o["self_ms"], f"{100 * o['share']:.1f} %", o["calls"]] for o in ops])
        flops = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in list(e["counts"]["top_flops"].items())[:6])
        parts.append(f"**{label}, {e['structure']}, {STEP_NAMES.get(e['mode'], e['mode'])}** "
                     f"(GFLOP by operation: {flops})\n\n{table}")
    return "\n\n".join(parts)


def _errors(data: dict) -> str:
    bad = [r for r in data["models"] if "error" in r]
    return "".join(f"\n\nNot measured: {r['label']}: {r['error'].splitlines()[0][:300]}" for r in bad)


def sections(data: dict, figure: str) -> list[tuple[str, str]]:
    peak, bw = machine_roofs(data)
    return [
        ("Machine roofs (measured in this run, same thread count as the models)",
         roofs_table(data) + f"\n\nRoofs used below: GEMM peak {fmt(peak)} GFLOP/s, bandwidth {fmt(bw)} GB/s "
         f"(ridge at {fmt(peak / bw)} flop/byte)."),
        ("Work, time and roofline per step (float32)",
         work_table(data) + f"\n\n![roofline]({figure})" + _errors(data)),
        ("Where the time goes (torch.profiler, self CPU time by class of operation)", time_table(data)),
        ("Top operations per step (self CPU time)", profile_tables(data)),
    ]


def plot(data: dict, path: Path) -> Path:
    """Achieved GFLOP/s against arithmetic intensity, log-log, under the GEMM peak and the bandwidth slope."""
    peak, bw = machine_roofs(data)
    points = list(rows(data))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = [d["intensity"] for _, _, d in points] or [1.0]
    lo, hi = min(min(xs) / 3, peak / bw / 10), max(max(xs) * 3, peak / bw * 10)
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [roof(x, peak, bw) for x in grid], color="black", lw=1.5,
            label=f"roof: {fmt(peak)} GFLOP/s GEMM, {fmt(bw)} GB/s")
    markers = {"infer": "o", "train": "s"}
    colours: dict[str, str] = {}
    for label, e, d in points:
        colour = colours.setdefault(label, f"C{len(colours)}")
        ax.scatter(d["intensity"], d["achieved"], marker=markers.get(e["mode"], "x"), color=colour,
                   label=f"{label} {e['structure']} {e['mode']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity, flop / byte moved (estimate)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("Roofline: one step, float32 (o inference, □ training)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
