"""torch.compile against eager: compile time and inference step time (energy, forces, stress) per model family.

    PYTHONPATH=. python -m benchmarks.compile_bench                      # CPU: writes benchmarks/results/compile.*
    PYTHONPATH=. python -m benchmarks.compile_bench --device cuda --out gpu_report/compile

Each model runs in a subprocess of its own (a fresh compiler state and an empty inductor cache, so the compile
time is a cold one) with a time limit; one step is ``Potential(batch)`` with forces and stress, the graph built
beforehand.  The compiled potential is checked against the eager one on every structure (largest force and
stress differences).  Models are the harness's (``benchmarks.suite.OURS_MODELS``), structures its
(``benchmarks.structures``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("egnn-64", "facet-64", "eqv2-64-l2")
DEFAULT_STRUCTURES = ("si64", "cu500")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step(step, device, warmup: int, steps: int) -> float:
    import numpy as np

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(model: str, structures: list[str], device: str, dtype: str, threads: int, warmup: int,
            steps: int, eager_only: bool = False) -> dict:
    """One model: eager and compiled step times on each structure, the compile time, the differences."""
    import torch
    from torch_geometric.data import Batch

    from benchmarks import structures as bench_structures
    from benchmarks.suite import OURS_MODELS
    from potentials.graph import AtomicGraph
    from potentials.potential import Potential, compile_backend

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    dev, dt = torch.device(device), getattr(torch, dtype)
    cfg = dict(OURS_MODELS[model])
    cls_path = cfg.pop("_target_")
    module_name, _, cls_name = cls_path.rpartition(".")
    cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
    cutoff = float(cfg["cutoff"])
    atoms = {name: bench_structures.build(name) for name in structures}
    batches = {name: Batch.from_data_list([AtomicGraph.from_atoms(a, cutoff, dtype=dt)]).to(dev)
               for name, a in atoms.items()}
    first = batches[structures[0]]
    cfg.setdefault("avg_num_neighbors", first.edge_index.shape[1] / first.pos.shape[0])
    potential = Potential(cls(**cfg), cutoff).to(device=dev, dtype=dt).eval()
    rows = []
    for name, batch in batches.items():
        def step(batch=batch):
            return potential(batch, compute_forces=True, compute_stress=True)

        potential.compiled = False
        eager_out = step()
        eager = _median_step(step, dev, warmup, steps)
        if eager_only:
            rows.append({"structure": name, "n_atoms": int(batch.pos.shape[0]),
                         "n_edges": int(batch.edge_index.shape[1]), "eager_s": eager})
            continue
        potential.compiled = True
        t0 = time.perf_counter()
        compiled_out = step()
        _sync(dev)
        first_call = time.perf_counter() - t0
        if not potential.compiled:  # the compiler failed and the potential fell back (a warning says why)
            rows.append({"structure": name, "n_atoms": int(batch.pos.shape[0]),
                         "n_edges": int(batch.edge_index.shape[1]), "eager_s": eager, "compile_failed": True})
            continue
        compiled = _median_step(step, dev, warmup, steps)
        rows.append({
            "structure": name, "n_atoms": int(batch.pos.shape[0]), "n_edges": int(batch.edge_index.shape[1]),
            "eager_s": eager, "compiled_s": compiled, "speedup": eager / compiled, "first_call_s": first_call,
            "max_dforces": float((eager_out["forces"] - compiled_out["forces"]).abs().max()),
            "max_dstress": float((eager_out["stress"] - compiled_out["stress"]).abs().max()),
            "denergy": float((eager_out["energy"] - compiled_out["energy"]).abs().max()),
        })
    return {"model": model, "config": OURS_MODELS[model], "backend": compile_backend(),
            "n_params": sum(p.numel() for p in potential.parameters()), "rows": rows}


def _child(args: argparse.Namespace) -> None:
    out = measure(args.child, args.structures.split(","), args.device, args.dtype, args.threads, args.warmup,
                  args.steps, args.eager_only)
    print("RESULT " + json.dumps(out))


def _run_model(model: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "benchmarks.compile_bench", "--child", model, "--structures", args.structures,
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--warmup",
           str(args.warmup), "--steps", str(args.steps)] + (["--eager-only"] if args.eager_only else [])
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: the compile time of a first run
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.limit)
        except subprocess.TimeoutExpired:
            return {"model": model, "error": f"did not finish within {args.limit} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            result["wall_s"] = wall
            result["warnings"] = [w for w in proc.stderr.splitlines() if "torch.compile" in w][:5]
            return result
    return {"model": model, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}


def _markdown(report: dict) -> str:
    title = "Inference step times, eager" if report.get("eager_only") else "torch.compile against eager"
    lines = [f"# {title} ({report['date']})", "",
             f"Device {report['device']} ({report['machine']}), {report['dtype']}, {report['threads']} thread(s), "
             f"torch {report['torch']}; median of {report['steps']} steps after {report['warmup']} warm-up; one step "
             "= energy, forces and stress of one structure (graph built beforehand).  First call = compile (cold "
             "inductor cache) + one step.  Command: `" + report["command"] + "`", "",
             "| model | structure | atoms | edges | eager ms | compiled ms | speed-up | first call s | max ΔF eV/Å "
             "| max Δσ eV/Å³ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | — | | | | | | | | {r['error']} |")
            continue
        for row in r["rows"]:
            if "compiled_s" not in row:
                state = "compile failed (eager fallback)" if row.get("compile_failed") else "not measured"
                lines.append(f"| {r['model']} | {row['structure']} | {row['n_atoms']} | {row['n_edges']} | "
                             f"{row['eager_s'] * 1e3:.1f} | {state} | | | | |")
                continue
            lines.append(f"| {r['model']} | {row['structure']} | {row['n_atoms']} | {row['n_edges']} | "
                         f"{row['eager_s'] * 1e3:.1f} | {row['compiled_s'] * 1e3:.1f} | {row['speedup']:.2f}x | "
                         f"{row['first_call_s']:.1f} | {row['max_dforces']:.1e} | {row['max_dstress']:.1e} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="labels of benchmarks.suite.OURS_MODELS")
    p.add_argument("--structures", default=",".join(DEFAULT_STRUCTURES), help="names in benchmarks.structures")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--limit", type=int, default=1500, help="seconds per model (compile included)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile"),
                   help="report path without suffix (.md and .json are written)")
    p.add_argument("--eager-only", action="store_true", help="eager step times only (no compiling)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    import torch

    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": args.device, "machine": platform.processor() or platform.machine(),
              "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__, "warmup": args.warmup,
              "steps": args.steps, "eager_only": args.eager_only,
              "command": "python -m benchmarks.compile_bench " + " ".join(argv or sys.argv[1:]),
              "results": []}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        report["machine"] = torch.cuda.get_device_name(torch.device(args.device))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        report["results"].append(_run_model(model, args))
        print(json.dumps(report["results"][-1])[:400], flush=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))  # after every model: partial results kept
        out.with_suffix(".md").write_text(_markdown(report))
    print(f"written {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
