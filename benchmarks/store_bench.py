"""Graph store throughput: conversion, random-access reads versus EGNN's training step, and memory.

    python -m benchmarks.store_bench            # 5-10 minutes on 2 cores the first time (builds the 100k store)
    python -m benchmarks.store_bench --quick    # smaller sets, no 100k store

Measures, on MPtrj-like frames (the 11 real frames of ``shared/data/mptrj``, repeated) and OC20-like frames
(the 47 of ``shared/data/oc20``, repeated):

* conversion speed (structures/s) of :func:`potentials.datasets.preprocess.convert`, in this process and with
  2 graph-building workers, with edges at 5 Å and without;
* random-access reads: ``StoreDataset[i]`` in random order in one process, and a shuffled DataLoader with
  2 workers and batches of 8 collated by :func:`~potentials.datasets.collate.collate_graphs` (what training
  sees, collation and the transfer from the workers included);
* how many structures per second EGNN (``potentials/conf/model/egnn.yaml``, the fastest model) trains on, batches
  of 8 from the same store, forces and stress in the loss, 2 threads; the goal is reads ≥ 10× that;
* a synthetic store of 100,000 frames (``<data_root>/bench/synthetic-100k``, kept for later use) and one of
  10,000, and the resident memory of a process that sets up the data module, computes the statistics and reads
  one full epoch through 2 workers from each: anonymous memory (what the process owns) and file-backed memory
  (store pages mapped from the page cache, shared and reclaimable) are reported apart.

Writes ``benchmarks/results/store.md`` (replacing the previous report; the date is inside) and prints the
same tables. Numbers from a loaded machine vary; the load average is recorded.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import ase  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.structures import shared_data_dir  # noqa: E402
from potentials.datasets import ase_files  # noqa: E402
from potentials.datasets.collate import collate_graphs  # noqa: E402
from potentials.datasets.preprocess import convert  # noqa: E402
from potentials.datasets.store import StoreDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CUTOFF = 5.0


def repeated(frames: list[ase.Atoms], n: int):
    """A source yielding ``n`` frames cycling through ``frames``."""
    return lambda: (frames[k % len(frames)] for k in range(n))


def synthetic(n: int, seed: int = 0):
    """A source of ``n`` random labelled periodic structures of 2–12 atoms (perturbed lattices, 10 elements)."""
    def frames():
        for k in range(n):
            rng = np.random.default_rng((seed, k))
            reps = rng.integers(1, 3, size=3) + np.array([1, 0, 0])
            grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 3)
            cell = np.diag(reps * 2.6) + rng.normal(scale=0.2, size=(3, 3))
            pos = (grid + rng.uniform(-0.12, 0.12, size=grid.shape)) @ (cell / reps[:, None])
            atoms = ase.Atoms(numbers=rng.choice([3, 8, 12, 13, 14, 22, 26, 29, 47, 79], len(grid)), positions=pos,
                              cell=cell, pbc=True)
            atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal(-4 * len(atoms), 1.0)),
                                               forces=rng.normal(size=(len(atoms), 3)),
                                               stress=rng.normal(scale=0.01, size=6))
            atoms.info.update(source="synthetic", frame=k, group=f"g{k // 10}")
            yield atoms
    return frames


def timed_convert(source, out: Path, n: int, **kwargs) -> dict:
    start = time.perf_counter()
    manifest = convert(source, out, cutoff=CUTOFF, overwrite=True, search_paths=[shared_data_dir()], **kwargs)
    seconds = time.perf_counter() - start
    return {"structures": n, "seconds": seconds, "rate": n / seconds, "bytes_per_record": manifest["bytes"] / n,
            "edges": manifest["edges"], "workers": kwargs.get("workers", 0)}


def random_reads(path: Path, seconds: float) -> float:
    """Structures/s of ``StoreDataset[i]`` at random ``i`` in this process (one core)."""
    ds = StoreDataset(path, cutoff=CUTOFF)
    order = np.random.default_rng(0).permutation(len(ds))
    ds[0]
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        ds[int(order[n % len(order)])]
        n += 1
    return n / (time.perf_counter() - start)


def _read_for(args: tuple[str, float, int]) -> int:
    path, seconds, seed = args
    ds = StoreDataset(path, cutoff=CUTOFF)
    order = np.random.default_rng(seed).permutation(len(ds))
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        ds[int(order[n % len(order)])]
        n += 1
    return n


def parallel_reads(path: Path, seconds: float, processes: int = 2) -> float:
    """Structures/s of ``StoreDataset[i]`` at random ``i`` in ``processes`` processes at once (no collation)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        counts = pool.map(_read_for, [(str(path), seconds, seed) for seed in range(processes)])
    return sum(counts) / seconds


def loader_reads(path: Path, seconds: float, workers: int = 2, batch_size: int = 8) -> float:
    """Structures/s through a shuffled DataLoader with ``workers`` processes (collation included)."""
    ds = StoreDataset(path, cutoff=CUTOFF)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True,
                        prefetch_factor=4, collate_fn=collate_graphs)
    it = iter(loader)
    for _ in range(2 * workers):  # workers started and warm
        next(it)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += batch.num_graphs
    return n / (time.perf_counter() - start)


def egnn_training(path: Path, seconds: float, batch_size: int = 8) -> float:
    """Structures/s of EGNN's training step (``model=egnn``, default loss) on batches from the store."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from potentials.conf import CONFIG_DIR
    from potentials.potential import Potential
    from potentials.training.run import register_resolvers

    register_resolvers()
    torch.set_num_threads(2)
    ds = StoreDataset(path, cutoff=CUTOFF)
    batches = list(DataLoader(torch.utils.data.Subset(ds, range(min(len(ds), 64 * batch_size))),
                              batch_size=batch_size, shuffle=True, collate_fn=collate_graphs))
    stats = ds.subset(np.arange(min(len(ds), 512))).cached_stats()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"cutoff={CUTOFF}"])
    with open_dict(cfg):
        cfg.data_stats = {"avg_num_neighbors": stats.avg_num_neighbors}
    potential = Potential(instantiate(cfg.model), CUTOFF, atomic_energies=stats.atomic_energies,
                          scale=stats.force_rms)
    loss_fn = instantiate(cfg.training.loss)
    optimizer = torch.optim.AdamW(potential.parameters(), lr=1e-3)

    def step(batch) -> None:
        optimizer.zero_grad()
        out = potential(batch, compute_forces=True, compute_stress=bool(batch.has_stress.any()), create_graph=True)
        loss_fn(out, batch)["total"].backward()
        optimizer.step()

    step(batches[0])
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = batches[(n // batch_size) % len(batches)]
        step(batch)
        n += batch.num_graphs
    return n / (time.perf_counter() - start)


def _memory(pid: int) -> dict[str, float]:
    """RssAnon and RssFile of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def rss_probe(path: str) -> dict:
    """(Run in a fresh process.) Data module over the store: setup, statistics, one epoch through 2 workers."""
    import psutil

    from potentials.datasets.datamodule import AtomsDataModule

    out = {"start": _memory(os.getpid())}
    dm = AtomsDataModule(dataset=StoreDataset(path, cutoff=CUTOFF), split={"val": 0.05, "test": 0.05},
                         batch_size=8, num_workers=2)
    dm.setup("fit")
    out["setup"] = _memory(os.getpid())
    start = time.perf_counter()
    out["num_structures"] = dm.stats.num_structures
    out["stats_seconds"] = time.perf_counter() - start
    out["stats"] = _memory(os.getpid())
    start, n, worker_peak = time.perf_counter(), 0, {}
    for k, batch in enumerate(dm.train_dataloader()):
        n += batch.num_graphs
        if k % 500 == 0:
            for child in psutil.Process().children():
                mem = _memory(child.pid)
                worker_peak = {key: max(worker_peak.get(key, 0.0), v) for key, v in mem.items()}
    out["epoch_seconds"] = time.perf_counter() - start
    out["epoch_structures"] = n
    out["epoch"] = _memory(os.getpid())
    out["worker_peak"] = worker_peak
    return out


def measure_rss(path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.store_bench", "--rss-probe", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic_store(path: Path, n: int) -> Path:
    manifest = path / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("num_records") == n:
        return path
    timed_convert(synthetic(n), path, n, workers=2, commit_every=2000)
    return path


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sets, no 100k store")
    parser.add_argument("--data-root", default=os.environ.get("POTENTIALS_DATA_ROOT", str(ROOT / "data")))
    parser.add_argument("--rss-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe)))
        return 0

    load_start = os.getloadavg()
    data = shared_data_dir()
    mptrj = ase_files.read(data / "mptrj" / "mptrj_10_thin_systems.db")
    oc20 = ase_files.read(data / "oc20" / "oc20_is2res_random1447590.traj")
    n = 600 if args.quick else 3000
    seconds = 5.0 if args.quick else 10.0
    report = {"settings": {"quick": args.quick, "frames": n, "cutoff": CUTOFF, "seconds_per_rate": seconds},
              "start": datetime.now().strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        conv = []
        for name, frames in (("MPtrj-like", mptrj), ("OC20-like", oc20)):
            for workers, edges in ((0, True), (2, True), (0, False)):
                r = timed_convert(repeated(frames, n), tmp / f"{name}-{workers}-{edges}", n, workers=workers,
                                  edges=edges)
                conv.append({"frames": name, **r})
        report["conversion"] = conv
        reads = []
        for name in ("MPtrj-like", "OC20-like"):
            for edges in (True, False):
                path = tmp / f"{name}-0-{edges}"
                reads.append({"frames": name, "edges": edges, "single_process": random_reads(path, seconds),
                              "two_processes": parallel_reads(path, seconds),
                              "loader_2_workers": loader_reads(path, seconds),
                              "egnn_train": egnn_training(path, seconds) if edges else None})
        report["reads"] = reads
    if not args.quick:
        bench = Path(args.data_root) / "bench"
        big = synthetic_store(bench / "synthetic-100k", 100_000)
        small = synthetic_store(bench / "synthetic-10k", 10_000)
        report["rss"] = {"10k": measure_rss(small), "100k": measure_rss(big)}
        report["synthetic_100k"] = json.loads((big / "manifest.json").read_text())["bytes"]
    report["load_average"] = {"start": load_start, "end": os.getloadavg()}
    text = render(report)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "store.md"
    out.write_text(text + "\n")
    print(f"\nwritten {out}")
    return 0


def render(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Graph store benchmark",
        "",
        f"- **date**: {report['start']}",
        f"- **command**: python -m benchmarks.store_bench{' --quick' if s['quick'] else ''}",
        f"- **machine**: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        f"- **load average (1/5/15 min) at start / end**: {[round(x, 2) for x in report['load_average']['start']]} / "
        f"{[round(x, 2) for x in report['load_average']['end']]}",
        f"- **settings**: {s['frames']} frames per set, cutoff {s['cutoff']} Å, float32 stores, "
        f"{s['seconds_per_rate']} s per rate; EGNN from potentials/conf/model/egnn.yaml, batch 8, "
        "forces + stress loss, 2 torch threads",
        "",
        "## Conversion (`convert`, structures/s)",
        "",
        table(["frames", "edges", "graph workers", "structures/s", "bytes/record"],
              [[c["frames"], "stored" if c["edges"] else "no", c["workers"], f"{c['rate']:.0f}",
                f"{c['bytes_per_record']:.0f}"] for c in report["conversion"]]),
        "",
        "## Random-access reads vs EGNN training",
        "",
        "Reads: `StoreDataset[i]` at random `i` (decoded AtomicGraphs) in 1 and in 2 processes; DataLoader: "
        "shuffled batches of 8 through 2 workers, collation and transfer included (what training receives). "
        "EGNN: training steps on batches of the same frames. Ratios: reads on 2 cores / training.",
        "",
        table(["frames", "edges", "reads/s, 1 process", "reads/s, 2 processes", "DataLoader 2 workers, structures/s",
               "EGNN train structures/s", "2-process reads / training", "DataLoader / training"],
              [[r["frames"], "stored" if r["edges"] else "built on read", f"{r['single_process']:.0f}",
                f"{r['two_processes']:.0f}", f"{r['loader_2_workers']:.0f}",
                "" if r["egnn_train"] is None else f"{r['egnn_train']:.1f}",
                "" if r["egnn_train"] is None else f"{r['two_processes'] / r['egnn_train']:.0f}×",
                "" if r["egnn_train"] is None else f"{r['loader_2_workers'] / r['egnn_train']:.0f}×"]
               for r in report["reads"]]),
    ]
    if "rss" in report:
        rows = []
        for size, r in report["rss"].items():
            rows.append([size, f"{r['setup']['RssAnon']:.0f}", f"{r['stats']['RssAnon']:.0f}",
                         f"{r['epoch']['RssAnon']:.0f}", f"{r['epoch']['RssFile']:.0f}",
                         f"{r['worker_peak'].get('RssAnon', 0):.0f}", f"{r['worker_peak'].get('RssFile', 0):.0f}",
                         f"{r['stats_seconds']:.1f}", f"{r['epoch_structures']} in {r['epoch_seconds']:.0f} s"])
        lines += [
            "",
            "## Memory of a training process reading a store, vs store size",
            "",
            f"Synthetic stores (2–12 atoms per frame, edges at {s['cutoff']} Å); the 100k store is "
            f"{report['synthetic_100k'] / 2**20:.0f} MiB on disk. MiB; anon = memory the process owns, file = store "
            "pages mapped from the page cache (shared, reclaimable, bounded by what was touched); a worker's anon "
            "counts the pages it shares copy-on-write with the main process.",
            "",
            table(["store", "anon after setup", "anon after stats", "anon after epoch", "file after epoch",
                   "worker anon (peak)", "worker file (peak)", "stats pass s (first run)", "epoch"], rows),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
