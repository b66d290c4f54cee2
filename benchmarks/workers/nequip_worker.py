"""NequIP worker: runs inside benchmarks/.venvs/nequip (nequip 0.19.1, nequip-allegro 0.8.3).

Request keys (JSON), as for the other workers:
    task: "infer" | "train_step" | "train_equal_time"
    model: {"builder": "preset" | "nequip" | "allegro", "r_max": 5.0, **builder keyword arguments}
    dtype: "float32" | "float64";  threads: int;  warmup: int;  steps: int;  seed: int
    device: "cpu" (default) | "cuda" | "auto" (cuda where this venv's torch sees a GPU)
The model is built by nequip's own model builders (``nequip.model.PresetNequIPGNNModel``,
``nequip.model.NequIPGNNModel`` or ``allegro.model.AllegroModel``), graphs by nequip's data pipeline
(``from_ase``, ``ChemicalSpeciesToAtomTypeMapper``, ``NeighborListTransform``); energy, forces and stress come
from the model's own autograd output block. nequip's global state (seeding, default dtype float64 for data,
TorchScript fuser settings) is set as its training entry point sets it; ``model_dtype`` follows ``dtype``.
Graphs are built and batched on the CPU and the batch's tensors moved to the device (``AtomicDataDict.to_``), as
nequip's training loop moves each batch; in ``train_equal_time`` the move happens as batches are drawn, outside the
timed step.

Equal-time training (``train_equal_time``) follows nequip's documented defaults, the loop being the harness's
shared one (same budget, splits, batch size 5, gradient clipping and evaluation points as every framework):
loss ``nequip.train.EnergyForceLoss`` (per-atom energy MSE and force MSE, coefficients 1 : 1; with stress labels
``EnergyForceStressLoss``, 1 : 1 : 1), Adam at learning rate 0.01, EMA of the weights with decay 0.999
(``nequip.train.ema.EMAWeights``, nequip's warm-up of the decay included) used for every evaluation,
``avg_num_neighbors`` measured on the training graphs, per-type energy shift the mean per-atom training energy
and scale the RMS training force (the ``training_data_stats`` choices of nequip's example configs).
"""

from __future__ import annotations

import ase.data
import ase.io
import numpy as np
import torch
from _common import (
    CLIP_GRAD_NORM,
    device_name,
    dispatch,
    error_summary,
    measure_infer,
    read_frames,
    resolve_device,
    result,
    run,
    synchronizer,
    time_steps,
    train_entry,
    train_for_budget,
    versions,
)
from nequip.data import AtomicDataDict, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.utils.global_state import set_global_state

VERSIONS = ("nequip", "nequip-allegro", "torch", "e3nn", "ase", "numpy", "lightning")
DEFAULTS = {"builder": "preset", "r_max": 5.0}


def setup(request: dict) -> str:
    """nequip's global state, then the harness's seed and threads; returns the model dtype name."""
    set_global_state()
    torch.manual_seed(int(request.get("seed", 0)))
    torch.set_num_threads(int(request.get("threads", 2)))
    return request.get("dtype", "float32")


def model_config(request: dict) -> dict:
    cfg = {**DEFAULTS, **request.get("model", {})}
    if cfg["builder"] == "preset":
        cfg.setdefault("preset", "S")
    return cfg


def build_model(cfg: dict, type_names: list[str], model_dtype: str, avg_num_neighbors: float,
                shift: float | None = None, scale: float | None = None, seed: int = 0) -> torch.nn.Module:
    """The nequip (or Allegro) model of ``cfg`` with random weights."""
    kwargs = {k: v for k, v in cfg.items() if k not in ("builder", "r_max")}
    common = {"seed": seed, "model_dtype": model_dtype, "type_names": list(type_names), "r_max": float(cfg["r_max"]),
              "avg_num_neighbors": float(avg_num_neighbors)}
    if shift is not None:
        common["per_type_energy_shifts"] = float(shift)
    if scale is not None:
        common["per_type_energy_scales"] = float(scale)
    builder = cfg["builder"]
    if builder == "preset":
        from nequip.model import PresetNequIPGNNModel
        return PresetNequIPGNNModel(**common, **kwargs)
    if builder == "nequip":
        from nequip.model import NequIPGNNModel
        return NequIPGNNModel(**common, **kwargs)
    if builder == "allegro":
        from allegro.model import AllegroModel
        kwargs = dict(kwargs)
        embed = {"_target_": "allegro.nn.TwoBodyBesselScalarEmbed", "num_bessels": int(kwargs.pop("num_bessels", 8))}
        return AllegroModel(**common, radial_chemical_embed=embed, **kwargs)
    raise ValueError(f"model.builder must be 'preset', 'nequip' or 'allegro', got {builder!r}")


class Graphs:
    """ase.Atoms → nequip AtomicDataDict with atom types and a neighbour list (nequip's own transforms)."""

    def __init__(self, type_names: list[str], r_max: float):
        self.types = ChemicalSpeciesToAtomTypeMapper(
            model_type_names=list(type_names), chemical_species_to_atom_type_map={t: t for t in type_names})
        self.neighbors = NeighborListTransform(r_max=float(r_max))

    def one(self, atoms: ase.Atoms) -> dict:
        return self.neighbors(self.types(from_ase(atoms)))

    def batch(self, frames: list, device: torch.device | str = "cpu") -> dict:
        return to_device(AtomicDataDict.batched_from_list([self.one(a) for a in frames]), device)


def to_device(data: dict, device: torch.device | str) -> dict:
    """A copy of the AtomicDataDict ``data`` with every tensor on ``device``."""
    return AtomicDataDict.to_(dict(data), torch.device(device))


def type_names_of(frames: list) -> list[str]:
    return sorted({s for a in frames for s in a.get_chemical_symbols()}, key=lambda s: ase.data.atomic_numbers[s])


def n_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def infer(request: dict) -> dict:
    model_dtype = setup(request)
    device = resolve_device(request, "nequip")
    cfg = model_config(request)
    warmup, steps = int(request.get("warmup", 3)), int(request.get("steps", 10))
    results, params = [], None
    for entry in request["structures"]:
        atoms = ase.io.read(entry["path"], index=0)
        graphs = Graphs(type_names_of([atoms]), cfg["r_max"])
        data = graphs.batch([atoms], device)
        n_edges = int(data[AtomicDataDict.EDGE_INDEX_KEY].shape[1])
        model = build_model(cfg, type_names_of([atoms]), model_dtype, n_edges / len(atoms)).to(device)
        model.eval()
        params = n_params(model)

        def model_step(data=data, model=model):
            out = model(dict(data))
            return {"energy": out[AtomicDataDict.TOTAL_ENERGY_KEY].detach()}

        def build_graph(atoms=atoms, graphs=graphs):
            return graphs.batch([atoms], device)

        def full_step(model=model):
            out = model(dict(build_graph()))
            return {"energy": out[AtomicDataDict.TOTAL_ENERGY_KEY].detach()}

        results.append(measure_infer(entry.get("name", entry["path"]), len(atoms), n_edges, model_step, build_graph,
                                     full_step, warmup, steps, synchronizer(device)))
    return result("nequip", VERSIONS, request, {**cfg, "n_params": params}, warmup, steps, results, device)


def train_step(request: dict) -> dict:
    """Timed optimiser steps with nequip's default loss (per-atom energy and force MSE, 1 : 1) and Adam."""
    from nequip.train import EnergyForceLoss

    model_dtype = setup(request)
    device = resolve_device(request, "nequip")
    cfg = model_config(request)
    warmup, steps = int(request.get("warmup", 2)), int(request.get("steps", 5))
    results, params = [], None
    for entry in request["structures"]:
        frames, bs = read_frames(entry)
        names = type_names_of(frames)
        graphs = Graphs(names, cfg["r_max"])
        batches = [graphs.batch(frames[k:k + bs], device) for k in range(0, len(frames) - bs + 1, bs)]
        n_edges = sum(int(b[AtomicDataDict.EDGE_INDEX_KEY].shape[1]) for b in batches)
        n_atoms_used = sum(int(b[AtomicDataDict.POSITIONS_KEY].shape[0]) for b in batches)
        model = build_model(cfg, names, model_dtype, n_edges / max(1, n_atoms_used)).to(device)
        model.train()
        params = n_params(model)
        loss_fn = EnergyForceLoss(type_names=names).to(device)  # a module of metrics: moved with the model
        opt = torch.optim.Adam(model.parameters(), lr=float(request.get("lr", 0.01)))
        counter = {"k": 0}

        def step(batches=batches, model=model, opt=opt, loss_fn=loss_fn, counter=counter):
            batch = batches[counter["k"] % len(batches)]
            counter["k"] += 1
            opt.zero_grad(set_to_none=True)
            loss_fn(model(dict(batch)), dict(batch))["weighted_sum"].backward()
            opt.step()

        results.append(train_entry(entry.get("name", entry["path"]), bs, n_atoms_used / len(batches),
                                   time_steps(step, warmup, steps, synchronizer(device))))
    return result("nequip", VERSIONS, request, {**cfg, "n_params": params}, warmup, steps, results, device)


def evaluate(model: torch.nn.Module, batches: list[dict], stress: bool) -> dict:
    """Energy MAE per structure (meV) and per atom (meV/atom), force-component MAE (meV/Å), stress MAE (meV/Å³)."""
    e_err, e_atom, f_err, s_err = [], [], [], []
    for b in batches:
        out = model(dict(b))
        n = b[AtomicDataDict.NUM_NODES_KEY].reshape(-1).to(torch.float64)
        de = (out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().reshape(-1).double()
              - b[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1).double()).abs()
        e_err.append(de)
        e_atom.append(de / n)
        f_err.append((out[AtomicDataDict.FORCE_KEY].detach().double()
                      - b[AtomicDataDict.FORCE_KEY].double()).abs().reshape(-1))
        if stress:
            s_err.append((out[AtomicDataDict.STRESS_KEY].detach().double().reshape(-1, 9)
                          - b[AtomicDataDict.STRESS_KEY].double().reshape(-1, 9)).abs().reshape(-1))
    return error_summary(e_err, e_atom, f_err, s_err)


def train_equal_time(request: dict) -> dict:
    from nequip.train import EnergyForceLoss, EnergyForceStressLoss
    from nequip.train.ema import EMAWeights

    model_dtype = setup(request)
    device = resolve_device(request, "nequip")
    cfg = model_config(request)
    budget, bs = float(request["budget_s"]), int(request.get("batch_size", 5))
    stress = bool(request.get("stress", False))
    train = ase.io.read(request["train"], index=":")
    names = type_names_of(train)
    graphs = Graphs(names, cfg["r_max"])
    train_graphs = [graphs.one(a) for a in train]
    tests = request.get("tests") or {"test": request["test"]}
    sets = {"val": request["val"], **tests}
    evals = {}
    sizes = {}
    for name, path in sets.items():
        frames = ase.io.read(path, index=":")
        sizes[name] = len(frames)
        evals[name] = [graphs.batch(frames[k:k + 50], device) for k in range(0, len(frames), 50)]
    n_atoms = sum(len(a) for a in train)
    avg_nb = sum(int(g[AtomicDataDict.EDGE_INDEX_KEY].shape[1]) for g in train_graphs) / n_atoms
    shift = float(np.mean([a.get_potential_energy() / len(a) for a in train]))
    scale = float(np.sqrt(np.mean(np.concatenate([a.get_forces().reshape(-1) for a in train]) ** 2)))
    model = build_model(cfg, names, model_dtype, avg_nb, shift=shift, scale=scale,
                        seed=int(request.get("seed", 0))).to(device)
    loss_fn = (EnergyForceStressLoss if stress else EnergyForceLoss)(type_names=names).to(device)
    lr = float(request.get("lr", 0.01))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = EMAWeights(model, decay=float(request.get("ema_decay", 0.999))).to(device)
    gen = torch.Generator().manual_seed(int(request.get("seed", 0)))

    def epoch():
        order = torch.randperm(len(train_graphs), generator=gen).tolist()
        return (to_device(AtomicDataDict.batched_from_list([train_graphs[k] for k in order[i:i + bs]]), device)
                for i in range(0, len(order) - bs + 1, bs))

    def step(batch, fraction):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(dict(batch)), dict(batch))["weighted_sum"]
        loss_fn.reset()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD_NORM)
        opt.step()
        ema.update_parameters(model)

    def metrics():
        ema.swap_parameters(model)
        try:
            res = {name: evaluate(model, batches, stress) for name, batches in evals.items()}
        finally:
            ema.swap_parameters(model)
        first = next(iter(tests))
        return {"val_f_mae_meV_A": res["val"]["f_mae_meV_A"], "val_e_mae_meV": res["val"]["e_mae_meV"],
                "test_f_mae_meV_A": res[first]["f_mae_meV_A"], "test_e_mae_meV": res[first]["e_mae_meV"],
                "sets": res}

    model.train()
    warm = next(iter(epoch()))
    loss_fn(model(dict(warm)), dict(warm))["weighted_sum"].backward()
    loss_fn.reset()
    opt.zero_grad(set_to_none=True)
    out = train_for_budget(epoch, step, metrics, budget, int(request.get("eval_points", 8)), synchronizer(device))
    final = out["curve"][-1]
    return {"peer": "nequip", "versions": versions(VERSIONS), "model": {**cfg, "n_params": n_params(model)},
            "dtype": model_dtype, "threads": torch.get_num_threads(), "device": device_name(device),
            "budget_s": budget, "batch_size": bs, "lr": lr,
            **out, "n_train": len(train), "n_val": sizes["val"], "n_test": sizes[next(iter(tests))],
            "sizes": sizes,
            "setup": {"loss": ("EnergyForceStressLoss 1:1:1" if stress else "EnergyForceLoss 1:1") + " (per-atom E)",
                      "optimizer": "Adam", "lr": lr, "ema_decay": float(request.get("ema_decay", 0.999)),
                      "shift": shift, "scale": scale, "avg_num_neighbors": avg_nb},
            "test_e_mae_meV": final["test_e_mae_meV"], "test_f_mae_meV_A": final["test_f_mae_meV_A"]}


def main(request: dict) -> dict:
    return dispatch(request, {"infer": infer, "train_step": train_step, "train_equal_time": train_equal_time})


if __name__ == "__main__":
    run(main)
