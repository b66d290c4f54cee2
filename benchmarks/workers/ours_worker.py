"""Worker for this project's own models: runs in the main venv with the project root on PYTHONPATH.

Same protocol and tasks as the peer workers (infer, train_step, train_equal_time), so every framework is
measured the same way: a fresh subprocess, the same thread settings, the same structures.  Two more tasks, for
this project's models only: ``roofline`` (counted work, time and profile of a step, benchmarks/roofline.py) and
``roofs`` (the machine's measured GEMM peak and memory bandwidth).

Request ``model``: ``{"_target_": "potentials.models.egnn.EGNN", "cutoff": 5.0, **constructor kwargs}``;
``avg_num_neighbors`` is measured on the structure (or the training set) unless given. The model is wrapped in
``potentials.potential.Potential``; graphs come from ``potentials.graph.AtomicGraph.from_atoms`` (neighbour lists
on the CPU) and are moved to the request's ``device`` with the model. ``roofline`` and ``roofs`` measure the CPU
only: for them ``auto`` means the CPU and ``cuda`` is refused.
"""

from __future__ import annotations

import importlib
import os

import ase.io
import numpy as np
import torch
from _common import (
    CLIP_GRAD_NORM,
    STRESS_WEIGHT,
    device_name,
    dispatch,
    error_summary,
    loss_weights,
    measure_infer,
    read_frames,
    resolve_device,
    result,
    run,
    setup_torch,
    synchronizer,
    time_steps,
    train_entry,
    train_for_budget,
    versions,
)
from torch_geometric.data import Batch

from potentials.graph import AtomicGraph
from potentials.potential import Potential

VERSIONS = ("potentials", "torch", "torch-geometric", "e3nn", "ase", "numpy", "vesin")


def model_config(request: dict) -> dict:
    cfg = dict(request.get("model", {}))
    if "_target_" not in cfg:
        raise ValueError("request.model needs '_target_', the import path of the model class")
    cfg.setdefault("cutoff", 5.0)
    return cfg


def build_potential(cfg: dict, avg_num_neighbors: float, atomic_energies: dict | None = None,
                    scale: float = 1.0, shift: float = 0.0) -> Potential:
    """Instantiate ``cfg['_target_']`` with the other keys and wrap it in a Potential."""
    module_name, _, cls_name = cfg["_target_"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
    kwargs.setdefault("avg_num_neighbors", float(avg_num_neighbors))
    model = cls(**kwargs)
    return Potential(model, cutoff=float(cfg["cutoff"]), atomic_energies=atomic_energies, scale=scale, shift=shift)


def to_batch(frames: list[ase.Atoms], cutoff: float, dtype: torch.dtype) -> Batch:
    return Batch.from_data_list([AtomicGraph.from_atoms(a, cutoff, dtype=dtype) for a in frames])


def n_params(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def infer(request: dict) -> dict:
    dtype = setup_torch(request)
    device = resolve_device(request, "ours")
    sync = synchronizer(device)
    cfg = model_config(request)
    cutoff = float(cfg["cutoff"])
    warmup, steps = int(request.get("warmup", 3)), int(request.get("steps", 10))
    results, params = [], None
    for entry in request["structures"]:
        atoms = ase.io.read(entry["path"], index=0)
        periodic = bool(atoms.pbc.all())
        batch = to_batch([atoms], cutoff, dtype).to(device)
        n_edges = int(batch.edge_index.shape[1])
        pot = build_potential(cfg, n_edges / len(atoms)).to(device=device, dtype=dtype)
        pot.eval()
        params = n_params(pot)

        def model_step(batch=batch, pot=pot, periodic=periodic):
            return pot(batch, compute_forces=True, compute_stress=periodic)

        def build_graph(atoms=atoms):
            return to_batch([atoms], cutoff, dtype).to(device)

        def full_step(pot=pot, periodic=periodic):
            return pot(build_graph(), compute_forces=True, compute_stress=periodic)

        results.append(measure_infer(entry.get("name", entry["path"]), len(atoms), n_edges, model_step, build_graph,
                                     full_step, warmup, steps, sync))
    return result("ours", VERSIONS, request, {**cfg, "n_params": params}, warmup, steps, results, device)


def loss_fn(out: dict, batch: Batch, weights: tuple[float, ...] = (1.0, 100.0)) -> torch.Tensor:
    """Weighted per-atom energy MSE + force-component MSE (eV units), 1 : 100 as in the peers' training steps;
    a third weight adds the stress-component MSE (eV/Å³) of the structures that have stress labels."""
    n_atoms = torch.bincount(batch.batch, minlength=batch.num_graphs).to(out["energy"].dtype)
    e_err = (out["energy"] - batch.energy.view(-1)) / n_atoms
    loss = weights[0] * (e_err ** 2).mean() + weights[1] * ((out["forces"] - batch.forces) ** 2).mean()
    if len(weights) > 2 and weights[2] and "stress" in out:
        mask = batch.has_stress.view(-1)
        if bool(mask.any()):
            loss = loss + weights[2] * ((out["stress"][mask] - batch.stress.view(-1, 3, 3)[mask]) ** 2).mean()
    return loss


def train_step(request: dict) -> dict:
    dtype = setup_torch(request)
    device = resolve_device(request, "ours")
    cfg = model_config(request)
    cutoff = float(cfg["cutoff"])
    warmup, steps = int(request.get("warmup", 2)), int(request.get("steps", 5))
    results, params = [], None
    for entry in request["structures"]:
        frames, bs = read_frames(entry)
        batches = [to_batch(frames[k:k + bs], cutoff, dtype).to(device) for k in range(0, len(frames) - bs + 1, bs)]
        n_atoms = sum(len(a) for a in frames)
        n_edges = sum(int(b.edge_index.shape[1]) for b in batches)
        pot = build_potential(cfg, n_edges / max(1, sum(int(b.num_nodes) for b in batches))).to(device=device,
                                                                                                  dtype=dtype)
        pot.train()
        params = n_params(pot)
        opt = torch.optim.AdamW(pot.parameters(), lr=float(request.get("lr", 5e-3)), amsgrad=True)
        counter = {"k": 0}

        def step(batches=batches, pot=pot, opt=opt, counter=counter):
            batch = batches[counter["k"] % len(batches)]
            counter["k"] += 1
            opt.zero_grad(set_to_none=True)
            loss_fn(pot(batch, compute_forces=True, compute_stress=False), batch).backward()
            opt.step()

        results.append(train_entry(entry.get("name", entry["path"]), bs, n_atoms / len(frames) * bs,
                                   time_steps(step, warmup, steps, synchronizer(device))))
    return result("ours", VERSIONS, request, {**cfg, "n_params": params}, warmup, steps, results, device)


def _roofline_step(pot: Potential, batch: Batch, mode: str, periodic: bool):
    """One inference step (energy, forces, stress where periodic) or one training step (force loss: a double
    backward, then the optimiser) as a function of no arguments."""
    if mode == "infer":
        pot.eval()
        return lambda: pot(batch, compute_forces=True, compute_stress=periodic)
    pot.train()
    opt = torch.optim.AdamW(pot.parameters(), lr=1e-3, amsgrad=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(pot(batch, compute_forces=True, compute_stress=False), batch).backward()
        opt.step()

    return step


def roofline(request: dict) -> dict:
    """Per structure and step kind (``modes``: infer, train): the step's median time, its counted floating-point
    work and bytes (benchmarks.roofline.count) and a profile of its top operations."""
    from benchmarks import roofline as rl

    dtype = setup_torch(request)
    device = resolve_device(request, "ours", cuda_ok=False)
    cfg = model_config(request)
    cutoff = float(cfg["cutoff"])
    warmup, steps = int(request.get("warmup", 2)), int(request.get("steps", 5))
    results, params = [], None
    for entry in request["structures"]:
        frames, _ = read_frames(entry)
        atoms = frames[0]
        batch = to_batch([atoms], cutoff, dtype)
        n_edges = int(batch.edge_index.shape[1])
        for mode in request.get("modes", ("infer", "train")):
            torch.manual_seed(int(request.get("seed", 0)))
            pot = build_potential(cfg, n_edges / len(atoms)).to(dtype)
            params = n_params(pot)
            step = _roofline_step(pot, batch, mode, bool(atoms.pbc.all()))
            load_before = os.getloadavg()
            times = time_steps(step, warmup, steps)
            load_after = os.getloadavg()
            counts = rl.count(step)
            profile = rl.profile_top(step, calls=int(request.get("profile_calls", 2)))
            results.append({"structure": entry.get("name", entry["path"]), "mode": mode, "n_atoms": len(atoms),
                            "n_edges": n_edges, "median_ms": 1e3 * float(np.median(times)),
                            "min_ms": 1e3 * float(np.min(times)), "counts": counts.as_dict(), "profile": profile,
                            "load_avg_before_after": [list(load_before), list(load_after)]})
    return result("ours", VERSIONS, request, {**cfg, "n_params": params}, warmup, steps, results, device)


def roofs(request: dict) -> dict:
    """The machine's measured roofs at the request's thread count: dense float32 GEMM and memory bandwidth."""
    from benchmarks import roofline as rl

    setup_torch(request)
    device = resolve_device(request, "ours", cuda_ok=False)
    gemm = [rl.gemm_peak(n, repeats=int(request.get("repeats", 5))) for n in request.get("gemm_sizes", (2048, 3072))]
    narrow = [rl.narrow_gemm(*shape) for shape in request.get("narrow_shapes", ((21000, 64, 64), (21000, 128, 64)))]
    return {"gemm": gemm, "narrow_gemm": narrow, "bandwidth": rl.bandwidth(repeats=int(request.get("repeats", 5))),
            "gemm_gflops": max(g["gflops"] for g in gemm), "threads": torch.get_num_threads(),
            "load_avg": list(os.getloadavg()), "versions": versions(VERSIONS), "device": device_name(device)}


def _reference_energies(frames: list[ase.Atoms]) -> tuple[dict, float, float]:
    """Least-squares E0 per element, mean residual energy per atom, RMS force (eV/Å)."""
    zs = sorted({int(z) for a in frames for z in a.numbers})
    counts = np.array([[np.count_nonzero(a.numbers == z) for z in zs] for a in frames], dtype=float)
    energies = np.array([a.get_potential_energy() for a in frames])
    e0 = np.linalg.lstsq(counts, energies, rcond=None)[0]
    shift = float(np.mean((energies - counts @ e0) / counts.sum(1)))
    rms = float(np.sqrt(np.mean(np.concatenate([a.get_forces().reshape(-1) for a in frames]) ** 2)))
    return dict(zip(zs, e0.tolist(), strict=True)), shift, rms


def evaluate(pot: Potential, batches: list[Batch], stress: bool = False) -> dict:
    """Energy MAE per structure (meV) and per atom (meV/atom), force-component MAE (meV/Å) and, with ``stress``,
    stress-component MAE (meV/Å³)."""
    e_err, e_atom, f_err, s_err = [], [], [], []
    for b in batches:
        out = pot(b, compute_forces=True, compute_stress=stress, create_graph=False)
        de = (out["energy"].detach() - b.energy.view(-1)).abs().double()
        e_err.append(de)
        e_atom.append(de / torch.bincount(b.batch, minlength=b.num_graphs).double())
        f_err.append((out["forces"].detach() - b.forces).abs().reshape(-1))
        if stress:
            s_err.append((out["stress"].detach() - b.stress.view(-1, 3, 3)).abs().reshape(-1))
    return error_summary(e_err, e_atom, f_err, s_err)


def train_equal_time(request: dict) -> dict:
    """Same protocol as the MACE baseline: AdamW amsgrad, EMA 0.99, batch 5, loss 1:100 then stage two."""
    dtype = setup_torch(request)
    device = resolve_device(request, "ours")
    cfg = model_config(request)
    cutoff, bs = float(cfg["cutoff"]), int(request.get("batch_size", 5))
    train = ase.io.read(request["train"], index=":")
    graphs = [AtomicGraph.from_atoms(a, cutoff, dtype=dtype).to(device) for a in train]
    tests = request.get("tests") or {"test": request["test"]}
    stress = bool(request.get("stress", False))
    chunks = {s: ase.io.read(p, index=":") for s, p in {"val": request["val"], **tests}.items()}
    evals = {s: [to_batch(f[k:k + 50], cutoff, dtype).to(device) for k in range(0, len(f), 50)]
             for s, f in chunks.items()}
    e0, shift, scale = _reference_energies(train)
    avg_nb = sum(int(g.edge_index.shape[1]) for g in graphs) / sum(len(a) for a in train)
    pot = build_potential(cfg, avg_nb, atomic_energies=e0, scale=scale, shift=shift).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(pot.parameters(), lr=float(request.get("lr", 0.01)), weight_decay=5e-7, amsgrad=True)
    ema = torch.optim.swa_utils.AveragedModel(
        pot, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(float(request.get("ema_decay", 0.99))))
    gen = torch.Generator().manual_seed(int(request.get("seed", 0)))

    def epoch():
        order = torch.randperm(len(graphs), generator=gen).tolist()
        return (Batch.from_data_list([graphs[k] for k in order[i:i + bs]])
                for i in range(0, len(order) - bs + 1, bs))

    stage_two = bool(request.get("stage_two", True))
    stage_two_lr = request.get("stage_two_lr")
    stage_two_lr = None if stage_two_lr is None else float(stage_two_lr)

    def step(batch, fraction):
        weights = (*loss_weights(fraction, opt, stage_two, stage_two_lr), STRESS_WEIGHT if stress else 0.0)
        opt.zero_grad(set_to_none=True)
        loss_fn(pot(batch, compute_forces=True, compute_stress=stress), batch, weights).backward()
        torch.nn.utils.clip_grad_norm_(pot.parameters(), CLIP_GRAD_NORM)
        opt.step()
        ema.update_parameters(pot)

    def metrics():
        res = {name: evaluate(ema.module, batches, stress) for name, batches in evals.items()}
        first = res[next(iter(tests))]
        return {"val_f_mae_meV_A": res["val"]["f_mae_meV_A"], "val_e_mae_meV": res["val"]["e_mae_meV"],
                "test_f_mae_meV_A": first["f_mae_meV_A"], "test_e_mae_meV": first["e_mae_meV"], "sets": res}

    pot.train()
    warm = next(iter(epoch()))
    loss_fn(pot(warm, compute_forces=True, compute_stress=stress), warm).backward()
    opt.zero_grad(set_to_none=True)
    out = train_for_budget(epoch, step, metrics, float(request["budget_s"]), int(request.get("eval_points", 8)),
                           synchronizer(device))
    final = out["curve"][-1]
    return {"peer": "ours", "versions": versions(VERSIONS), "model": {**cfg, "n_params": n_params(pot)},
            "dtype": request.get("dtype", "float32"), "threads": torch.get_num_threads(),
            "device": device_name(device), "budget_s": float(request["budget_s"]), "batch_size": bs,
            "lr": float(request.get("lr", 0.01)), "seed": int(request.get("seed", 0)),
            "recipe": {k: request[k] for k in ("ema_decay", "stage_two", "stage_two_lr") if k in request}, **out,
            "n_train": len(train), "n_val": len(chunks["val"]), "n_test": len(chunks[next(iter(tests))]),
            "sizes": {k: len(v) for k, v in chunks.items()}, "stress": stress,
            "test_e_mae_meV": final["test_e_mae_meV"], "test_f_mae_meV_A": final["test_f_mae_meV_A"]}


def main(request: dict) -> dict:
    return dispatch(request, {"infer": infer, "train_step": train_step, "train_equal_time": train_equal_time,
                              "roofline": roofline, "roofs": roofs})


if __name__ == "__main__":
    run(main)
