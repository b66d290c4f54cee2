"""MACE trained for a wall-clock budget (accuracy at equal time); imported by mace_worker.py in the mace venv.

The loop follows mace's own defaults for a standard run: loss = 1 × per-atom energy MSE + 100 × force MSE
(mace's ``WeightedEnergyForcesLoss``, eV units), AdamW with amsgrad, learning rate 0.01 (constant: a
plateau scheduler with mace's 50-epoch patience never acts within short budgets), and for the last quarter
of the budget mace's second stage (``--swa``: energy weight 1000, learning rate 1e-3), weight decay 5e-7,
batch size 5, exponential moving average of the weights (decay 0.99) used for every evaluation.
Atomic reference energies come from a least-squares fit on the training set (mace's ``E0s="average"``),
the interaction scale is the RMS training force (``rms_forces_scaling``), ``avg_num_neighbors`` is measured
on the training graphs. Only optimiser steps count against the budget; evaluations pause the clock, and one
untimed forward/backward pass before the clock starts absorbs the one-off kernel building of the first call.

Request keys: train, val, test (extxyz paths with energy eV and forces eV/Å), budget_s, model, dtype,
threads, seed, batch_size (5), lr (0.01), ema_decay (0.99), eval_points (8, log-spaced in time), device (cpu,
cuda or auto). As in mace's own training loop, batches are collated on the CPU and moved to the device whole
(mace's collation keeps ``ptr`` on the CPU); the move happens as the loader yields, outside the timed step.
"""

from __future__ import annotations

import ase.io
import numpy as np
import torch
from _common import (
    CLIP_GRAD_NORM,
    STRESS_WEIGHT,
    device_name,
    error_summary,
    loss_weights,
    resolve_device,
    setup_torch,
    synchronizer,
    train_for_budget,
    versions,
)
from mace import data as mace_data
from mace import modules
from mace.tools import torch_geometric
from mace.tools.utils import AtomicNumberTable
from mace_worker import KEYSPEC, VERSIONS, _Ref, build_model, hidden_irreps, labelled, model_config, n_params
from torch_ema import ExponentialMovingAverage


def _graphs(path: str, z_table: AtomicNumberTable, r_max: float) -> tuple[list, list]:
    frames = [labelled(a) for a in ase.io.read(path, index=":")]
    configs = [mace_data.config_from_atoms(a, key_specification=KEYSPEC) for a in frames]
    graphs = [mace_data.AtomicData.from_config(c, z_table=z_table, cutoff=r_max) for c in configs]
    return configs, graphs


def _loader(graphs: list, batch_size: int, shuffle: bool) -> torch_geometric.dataloader.DataLoader:
    return torch_geometric.dataloader.DataLoader(graphs, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle)


def evaluate(model: torch.nn.Module, loader, stress: bool = False, device: torch.device | str = "cpu") -> dict:
    """Energy MAE per structure (meV) and per atom (meV/atom), force-component MAE (meV/Å) and, with ``stress``,
    stress-component MAE (meV/Å³)."""
    e_err, e_atom, f_err, s_err = [], [], [], []
    for batch in loader:
        batch = batch.to(device)
        out = model(batch.to_dict(), training=False, compute_force=True, compute_stress=stress)
        de = (out["energy"].detach() - batch.energy).abs().double()
        e_err.append(de)
        e_atom.append(de / (batch.ptr[1:] - batch.ptr[:-1]).double())
        f_err.append((out["forces"].detach() - batch.forces).abs().reshape(-1))
        if stress:
            s_err.append((out["stress"].detach() - batch.stress.view(-1, 3, 3)).abs().reshape(-1))
    return error_summary(e_err, e_atom, f_err, s_err)


def _statistics(configs: list, graphs: list, z_table: AtomicNumberTable) -> tuple[np.ndarray, float, float, float]:
    e0s = mace_data.compute_average_E0s(configs, z_table)
    atomic_energies = np.array([e0s[z] for z in z_table.zs])
    inter = []
    for c in configs:
        e_ref = sum(e0s[int(z)] for z in c.atomic_numbers)
        inter.append((c.properties["energy"] - e_ref) / len(c.atomic_numbers))
    forces = np.concatenate([c.properties["forces"].reshape(-1) for c in configs])
    n_edges = sum(int(g.edge_index.shape[1]) for g in graphs)
    n_atoms = sum(len(c.atomic_numbers) for c in configs)
    return atomic_energies, float(np.mean(inter)), float(np.sqrt(np.mean(forces ** 2))), n_edges / n_atoms


def train_equal_time(request: dict) -> dict:
    setup_torch(request)
    device = resolve_device(request, "mace")
    cfg = model_config(request)
    budget = float(request["budget_s"])
    bs = int(request.get("batch_size", 5))
    train_frames = ase.io.read(request["train"], index=":")
    z_table = AtomicNumberTable(sorted({int(z) for a in train_frames for z in a.numbers}))
    train_cfgs, train_graphs = _graphs(request["train"], z_table, cfg["r_max"])
    tests = request.get("tests") or {"test": request["test"]}
    stress = bool(request.get("stress", False))
    eval_paths = {"val": request["val"], **tests}
    eval_graphs = {name: _graphs(path, z_table, cfg["r_max"])[1] for name, path in eval_paths.items()}
    atomic_energies, shift, scale, avg_nb = _statistics(train_cfgs, train_graphs, z_table)
    model = build_model(cfg, z_table.zs, avg_nb, atomic_energies=atomic_energies, scale=scale, shift=shift).to(device)
    if stress:
        loss_fn = modules.WeightedEnergyForcesStressLoss(energy_weight=1.0, forces_weight=100.0,
                                                         stress_weight=STRESS_WEIGHT)
    else:
        loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0)
    opt = torch.optim.AdamW(model.parameters(), lr=float(request.get("lr", 0.01)), weight_decay=5e-7, amsgrad=True)
    ema = ExponentialMovingAverage(model.parameters(), decay=float(request.get("ema_decay", 0.99)))
    train_loader = _loader(train_graphs, bs, shuffle=True)
    eval_loaders = {name: _loader(graphs, 50, False) for name, graphs in eval_graphs.items()}

    stage_two = bool(request.get("stage_two", True))

    def step(batch, fraction):
        loss_fn.energy_weight.fill_(loss_weights(fraction, opt, stage_two)[0])
        batch_dict = batch.to_dict()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(_Ref(batch_dict), model(batch_dict, training=True, compute_force=True, compute_stress=stress))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD_NORM)
        opt.step()
        ema.update()

    def metrics():
        model.eval()
        with ema.average_parameters():
            res = {name: evaluate(model, loader, stress, device) for name, loader in eval_loaders.items()}
        model.train()
        first = res[next(iter(tests))]
        return {"val_f_mae_meV_A": res["val"]["f_mae_meV_A"], "val_e_mae_meV": res["val"]["e_mae_meV"],
                "test_f_mae_meV_A": first["f_mae_meV_A"], "test_e_mae_meV": first["e_mae_meV"], "sets": res}

    model.train()
    # One untimed forward/backward first: e3nn and TorchScript build their kernels on the first call.
    warm = next(iter(train_loader)).to(device).to_dict()
    loss_fn(_Ref(warm), model(warm, training=True, compute_force=True, compute_stress=stress)).backward()
    opt.zero_grad(set_to_none=True)
    run = train_for_budget(lambda: (batch.to(device) for batch in train_loader), step, metrics, budget,
                           int(request.get("eval_points", 8)), synchronizer(device))
    curve = run["curve"]
    final = curve[-1]
    return {"peer": "mace", "versions": versions(VERSIONS),
            "model": {**cfg, "hidden_irreps": hidden_irreps(cfg), "n_params": n_params(model)},
            "dtype": request.get("dtype", "float32"), "threads": torch.get_num_threads(),
            "device": device_name(device), "budget_s": budget, "lr": float(request.get("lr", 0.01)),
            "train_s": run["train_s"], "steps": run["steps"],
            "epochs": run["epochs"],
            "batch_size": bs,
            "n_train": len(train_graphs), "n_val": len(eval_graphs["val"]),
            "n_test": len(eval_graphs[next(iter(tests))]),
            "sizes": {k: len(v) for k, v in eval_graphs.items()}, "stress": stress,
            "setup": {"loss": "1*E/atom MSE + 100*F MSE (eV); last 25%: 1000*E, lr 1e-3" if stage_two
                      else "1*E/atom MSE + 100*F MSE (eV)", "optimizer": "AdamW amsgrad wd 5e-7",
                      "lr": float(request.get("lr", 0.01)), "ema_decay": float(request.get("ema_decay", 0.99)),
                      "E0s": "least squares on train", "scale": scale, "shift": shift, "avg_num_neighbors": avg_nb},
            "test_e_mae_meV": final["test_e_mae_meV"], "test_f_mae_meV_A": final["test_f_mae_meV_A"],
            "curve": curve}
