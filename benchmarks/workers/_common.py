"""Helpers shared by the peer workers; imported inside the peer venvs, so it needs only numpy, torch and ase.

Protocol: a worker reads one JSON request (stdin, or ``argv[1]`` as a JSON string or a path to a JSON file)
and prints exactly one JSON object as its last stdout line. On failure it prints ``{"error": ...}`` and
exits with status 1.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np


def read_request(argv: list[str] | None = None) -> dict:
    """The request: ``argv[1]`` (JSON text or a path to a JSON file), else stdin."""
    argv = sys.argv if argv is None else argv
    if len(argv) > 1:
        text = argv[1]
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
    else:
        text = sys.stdin.read()
    request = json.loads(text)
    if not isinstance(request, dict) or "task" not in request:
        raise ValueError(f"a worker request must be a JSON object with a 'task' key, got: {text[:200]!r}")
    return request


def emit(result: dict) -> None:
    """Print the result as the last stdout line."""
    sys.stdout.flush()
    print(json.dumps(result, default=float), flush=True)


def versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``names`` plus Python's."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    out["python"] = platform.python_version()
    return out


#: Values of the request's ``device`` field: ``auto`` is CUDA where this worker's torch sees a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(request: dict, peer: str, cuda_ok: bool = True):
    """The torch device the request asks for (``device``: auto, cpu or cuda; default cpu).

    Args:
        peer: the framework's name, for the error message.
        cuda_ok: False for tasks that measure the CPU only; ``auto`` then means the CPU and ``cuda`` is refused.

    Raises:
        ValueError: an unknown device, or ``cuda`` where the task or this worker's torch cannot use it.
    """
    import torch

    asked = str(request.get("device", "cpu"))
    if asked not in DEVICES:
        raise ValueError(f"request field 'device' must be one of {list(DEVICES)}, got {asked!r}")
    if asked == "cuda" and not cuda_ok:
        raise ValueError(f"the {request['task']!r} task of the {peer} worker measures the CPU only; run it with "
                         "device cpu (--device cpu)")
    available = cuda_ok and torch.cuda.is_available()
    if asked == "cuda" and not available:
        build = (f"a CUDA {torch.version.cuda} build that finds no usable GPU" if torch.version.cuda
                 else "a CPU-only build")
        raise RuntimeError(
            f"device 'cuda' was asked of the {peer} worker, but its torch {torch.__version__} ({sys.executable}) "
            f"is {build}: torch.cuda.is_available() is False. Install a CUDA build of torch into that environment "
            "(for the peer venvs: set POTENTIALS_BENCH_TORCH_INDEX to a PyTorch CUDA wheel index and run "
            "'python -m benchmarks setup --force', see docs/benchmarks.md), or run with --device auto or cpu.")
    return torch.device("cuda" if asked == "cuda" or (asked == "auto" and available) else "cpu")


def device_name(device) -> str:
    """``"cpu"`` or e.g. ``"cuda:0 (NVIDIA H100 80GB HBM3)"``: the device a result was measured on."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def synchronizer(device) -> Callable[[], None]:
    """What to call before reading the clock: waits for the device's queued kernels on CUDA, nothing on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _no_sync


def _no_sync() -> None:
    return None


def setup_torch(request: dict):
    """Seed, thread count and default dtype from the request; return the dtype."""
    import torch

    torch.manual_seed(int(request.get("seed", 0)))
    torch.set_num_threads(int(request.get("threads", 2)))
    dtype = {"float32": torch.float32, "float64": torch.float64}[request.get("dtype", "float32")]
    torch.set_default_dtype(dtype)
    return dtype


def error_summary(e_err: list, e_atom: list, f_err: list, s_err: list) -> dict:
    """Mean absolute errors in meV (per structure and per atom), meV/Å and, where ``s_err`` holds anything, meV/Å³,
    from lists of absolute-error tensors (one per batch)."""
    import torch

    res = {"e_mae_meV": 1e3 * float(torch.cat(e_err).mean()), "e_mae_meV_atom": 1e3 * float(torch.cat(e_atom).mean()),
           "f_mae_meV_A": 1e3 * float(torch.cat(f_err).mean())}
    if s_err:
        res["s_mae_meV_A3"] = 1e3 * float(torch.cat(s_err).mean())
    return res


def time_steps(step: Callable[[], object], warmup: int, steps: int,
               sync: Callable[[], None] = _no_sync) -> list[float]:
    """Call ``step`` ``warmup`` times untimed, then ``steps`` times; return each timed call's seconds.

    ``sync`` (see :func:`synchronizer`) runs before every clock reading, so a GPU's queued work is counted."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def rate(times: list[float], per_step: float = 1.0) -> dict:
    """Median seconds per step and the derived rate (``per_step`` units per second)."""
    med = float(np.median(times))
    return {"median_s": med, "min_s": float(np.min(times)), "per_s": per_step / med if med > 0 else float("nan")}


def infer_entry(name: str, n_atoms: int, n_edges: int, graph_t: list[float], model_t: list[float],
                total_t: list[float], energy: float) -> dict:
    """One structure's inference measurement: model only, graph building alone, and both together."""
    model, graph, total = rate(model_t), rate(graph_t), rate(total_t)
    return {
        "structure": name,
        "n_atoms": n_atoms,
        "n_edges": n_edges,
        "graph_ms": 1e3 * graph["median_s"],
        "model_ms": 1e3 * model["median_s"],
        "model_ms_min": 1e3 * model["min_s"],
        "total_ms": 1e3 * total["median_s"],
        "steps_per_s": model["per_s"],
        "atom_steps_per_s": model["per_s"] * n_atoms,
        "steps_per_s_with_graph": total["per_s"],
        "atom_steps_per_s_with_graph": total["per_s"] * n_atoms,
        "energy_eV": energy,
    }


#: Gradient-norm clipping of the equal-time recipe (mace's ``--clip_grad`` default).
CLIP_GRAD_NORM = 10.0

#: Weight of the stress-component MSE (eV/Å³) in the equal-time loss where the data carry stress (mace's
#: ``--stress_weight`` default for its stress loss), beside 1 × per-atom energy and 100 × force MSE.
STRESS_WEIGHT = 1.0

#: MACE's second training stage (its ``--swa`` defaults): for the last quarter of training the energy weight
#: rises from 1 to 1000 (forces stay at 100) and the learning rate drops to 1e-3.
STAGE_TWO = {"start": 0.75, "energy_weight": 1000.0, "forces_weight": 100.0, "lr": 1e-3}


def loss_weights(fraction: float, optimizer=None, stage_two: bool = True,
                 stage_two_lr: float | None = None) -> tuple[float, float]:
    """(energy, forces) loss weights at ``fraction`` of the budget; sets the stage-two learning rate
    (``stage_two_lr``, else MACE's 1e-3)."""
    if not stage_two or fraction < STAGE_TWO["start"]:
        return 1.0, 100.0
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = STAGE_TWO["lr"] if stage_two_lr is None else stage_two_lr
    return STAGE_TWO["energy_weight"], STAGE_TWO["forces_weight"]


def train_for_budget(epochs: Callable[[], object], step: Callable[[object, float], None],
                     evaluate: Callable[[], dict], budget_s: float, n_points: int = 8,
                     sync: Callable[[], None] = _no_sync) -> dict:
    """Optimiser steps until ``budget_s`` seconds of stepping have passed, evaluating at log-spaced times.

    Only the ``step`` calls count against the budget; ``evaluate`` pauses the clock.

    Args:
        epochs: returns a fresh iterable of training batches (one epoch) each time it is called.
        step: one optimiser step on one batch; also given the fraction of the budget already spent.
        evaluate: returns a dict of metrics; called at ``n_points`` times log-spaced up to the budget
            (halving from the end) and once at the end.
        budget_s: seconds of optimiser steps.
        sync: called before every clock reading (:func:`synchronizer`: waits for the GPU on CUDA).

    Returns:
        ``{"train_s", "steps", "epochs", "curve": [{"elapsed_s", "steps", "epoch", **metrics}]}``.
    """
    marks = list(np.geomspace(budget_s / 2 ** (n_points - 1), budget_s, n_points))
    state = {"elapsed": 0.0, "steps": 0, "epoch": 0}
    curve: list[dict] = []

    def record():
        if curve and curve[-1]["steps"] == state["steps"]:
            return
        curve.append({"elapsed_s": state["elapsed"], "steps": state["steps"], "epoch": state["epoch"],
                      **evaluate()})

    while state["elapsed"] < budget_s:
        state["epoch"] += 1
        n_before = state["steps"]
        for batch in epochs():
            sync()
            t0 = time.perf_counter()
            step(batch, state["elapsed"] / budget_s)
            sync()
            state["elapsed"] += time.perf_counter() - t0
            state["steps"] += 1
            while marks and state["elapsed"] >= marks[0]:
                marks.pop(0)
                record()
            if state["elapsed"] >= budget_s:
                break
        if state["steps"] == n_before:
            raise ValueError("the training set yields no batch: fewer frames than the batch size?")
    record()
    return {"train_s": state["elapsed"], "steps": state["steps"], "epochs": state["epoch"], "curve": curve}


def read_frames(entry: dict) -> tuple[list, int]:
    """Frames of ``entry["path"]`` (zero energy/forces where unlabelled) and ``entry["batch_size"]`` (default 1)."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = ase.io.read(entry["path"], index=":")
    for atoms in frames:
        if atoms.calc is None or "forces" not in atoms.calc.results:
            atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((len(atoms), 3)))
    batch_size = int(entry.get("batch_size", 1))
    if len(frames) < batch_size:
        raise ValueError(f"{entry['path']} holds {len(frames)} frames, fewer than batch_size {batch_size}")
    return frames, batch_size


def measure_infer(name: str, n_atoms: int, n_edges: int, model_step: Callable[[], dict],
                  build_graph: Callable[[], object], full_step: Callable[[], dict], warmup: int, steps: int,
                  sync: Callable[[], None] = _no_sync) -> dict:
    """Time the model on a prebuilt graph, graph building alone, and both; ``model_step()`` returns "energy"."""
    model_t = time_steps(model_step, warmup, steps, sync)
    graph_t = time_steps(build_graph, 1, steps, sync)
    total_t = time_steps(full_step, 1, steps, sync)
    energy = float(model_step()["energy"].sum())
    return infer_entry(name, n_atoms, n_edges, graph_t, model_t, total_t, energy)


def train_entry(name: str, batch_size: int, atoms_per_batch: float, times: list[float]) -> dict:
    """One structure set's training-step measurement."""
    med = float(np.median(times))
    return {"structure": name, "batch_size": batch_size, "atoms_per_batch": atoms_per_batch, "step_ms": 1e3 * med,
            "structures_per_s": batch_size / med, "atoms_per_s": atoms_per_batch / med}


def result(peer: str, names: tuple[str, ...], request: dict, model: dict, warmup: int, steps: int,
           results: list[dict], device) -> dict:
    """The JSON answer of an infer or train_step task; ``device``: the torch device it ran on."""
    import torch

    return {"peer": peer, "versions": versions(names), "model": model, "dtype": request.get("dtype", "float32"),
            "threads": torch.get_num_threads(), "device": device_name(device), "warmup": warmup, "steps": steps,
            "results": results}


def dispatch(request: dict, tasks: dict[str, Callable[[dict], dict]]) -> dict:
    """Call the task named by the request."""
    if request["task"] not in tasks:
        raise ValueError(f"unknown task {request['task']!r}; this worker does {sorted(tasks)}")
    return tasks[request["task"]](request)


def run(main: Callable[[dict], dict]) -> None:
    """Read the request, call ``main``, print its result (or the error) and exit."""
    try:
        request = read_request()
        result = main(request)
        result.setdefault("task", request["task"])
        emit(result)
    except Exception as exc:  # the parent needs a JSON answer whatever failed
        traceback.print_exc(file=sys.stderr)
        emit({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
