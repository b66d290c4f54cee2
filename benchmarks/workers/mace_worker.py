"""MACE worker: runs inside benchmarks/.venvs/mace (mace-torch 0.3.16, e3nn 0.4.4).

Request keys (JSON):
    task: "infer" | "train_step" | "train_equal_time"
    structures: [{"name": str, "path": extxyz, "batch_size": int (train_step, default 1)}]
    model: {"channels": 64, "max_L": 1, "correlation": 3, "r_max": 5.0, "num_interactions": 2,
            "num_bessel": 8, "num_polynomial_cutoff": 5, "max_ell": 3}
    dtype: "float32" | "float64";  threads: int;  warmup: int;  steps: int;  seed: int
    device: "cpu" (default) | "cuda" | "auto" (cuda where this venv's torch sees a GPU)
The model is ``mace.modules.ScaleShiftMACE`` as mace's own ``--model MACE`` builds it (first interaction
RealAgnosticInteractionBlock, then RealAgnosticResidualInteractionBlock, MLP_irreps 16x0e, radial MLP
[64, 64, 64], SiLU gate), with random weights and ``avg_num_neighbors`` measured on the structure. Graphs are
built on the CPU (mace's matscipy neighbour list) and moved, collated, to the device of the model.
"""

from __future__ import annotations

import ase.io
import mace  # noqa: F401  (mace must be imported before e3nn so that its e3nn 0.4.4 patches apply)
import numpy as np
import torch
from _common import (
    dispatch,
    measure_infer,
    read_frames,
    resolve_device,
    result,
    run,
    setup_torch,
    synchronizer,
    time_steps,
    train_entry,
)
from e3nn import o3
from mace import data as mace_data
from mace import modules
from mace.tools import torch_geometric
from mace.tools.utils import AtomicNumberTable

VERSIONS = ("mace-torch", "torch", "e3nn", "ase", "numpy", "matscipy")
KEYSPEC = mace_data.KeySpecification(
    info_keys={"energy": "REF_energy", "stress": "REF_stress"}, arrays_keys={"forces": "REF_forces"}
)
DEFAULTS = {"channels": 64, "max_L": 1, "correlation": 3, "r_max": 5.0, "num_interactions": 2,
            "num_bessel": 8, "num_polynomial_cutoff": 5, "max_ell": 3}


def model_config(request: dict) -> dict:
    """Hyper-parameters of the request with defaults filled in."""
    return {**DEFAULTS, **request.get("model", {})}


def hidden_irreps(cfg: dict) -> str:
    """e.g. channels 64, max_L 1 → ``"64x0e+64x1o"``."""
    if cfg.get("hidden_irreps"):
        return cfg["hidden_irreps"]
    return "+".join(f"{cfg['channels']}x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(cfg["max_L"] + 1))


def build_model(cfg: dict, zs: list[int], avg_num_neighbors: float, atomic_energies: np.ndarray | None = None,
                scale: float = 1.0, shift: float = 0.0) -> torch.nn.Module:
    """ScaleShiftMACE for elements ``zs`` (sorted) with random weights."""
    if atomic_energies is None:
        atomic_energies = np.zeros(len(zs))
    return modules.ScaleShiftMACE(
        r_max=float(cfg["r_max"]),
        num_bessel=int(cfg["num_bessel"]),
        num_polynomial_cutoff=int(cfg["num_polynomial_cutoff"]),
        max_ell=int(cfg["max_ell"]),
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=int(cfg["num_interactions"]),
        num_elements=len(zs),
        hidden_irreps=o3.Irreps(hidden_irreps(cfg)),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.asarray(atomic_energies, dtype=float),
        avg_num_neighbors=float(avg_num_neighbors),
        atomic_numbers=list(zs),
        correlation=int(cfg["correlation"]),
        gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64],
        atomic_inter_scale=float(scale),
        atomic_inter_shift=float(shift),
    )


def labelled(atoms: ase.Atoms) -> ase.Atoms:
    """Copy calculator labels into the keys mace reads; zeros where a structure has none."""
    res = dict(atoms.calc.results) if atoms.calc is not None else {}
    atoms.info["REF_energy"] = float(res.get("energy", 0.0))
    atoms.arrays["REF_forces"] = np.asarray(res.get("forces", np.zeros((len(atoms), 3))), dtype=float)
    if "stress" in res:
        atoms.info["REF_stress"] = np.asarray(res["stress"], dtype=float)
    return atoms


def to_data(atoms_list: list[ase.Atoms], z_table: AtomicNumberTable, r_max: float) -> list:
    """mace AtomicData graphs (matscipy neighbour list inside)."""
    configs = [mace_data.config_from_atoms(labelled(a), key_specification=KEYSPEC) for a in atoms_list]
    return [mace_data.AtomicData.from_config(c, z_table=z_table, cutoff=r_max) for c in configs]


def collate(graphs: list, device: torch.device | str = "cpu") -> dict:
    """One batch dict from AtomicData graphs, its tensors on ``device``."""
    loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)
    return next(iter(loader)).to(device).to_dict()


def n_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _described(cfg: dict, params: int | None) -> dict:
    return {**cfg, "hidden_irreps": hidden_irreps(cfg), "n_params": params}


def infer(request: dict) -> dict:
    """E+F+S per step on each structure: model alone, graph building alone, and both."""
    setup_torch(request)
    device = resolve_device(request, "mace")
    cfg = model_config(request)
    warmup, steps = int(request.get("warmup", 3)), int(request.get("steps", 10))
    results, params = [], None
    for entry in request["structures"]:
        atoms = ase.io.read(entry["path"], index=0)
        zs = sorted(set(atoms.numbers.tolist()))
        z_table = AtomicNumberTable(zs)
        periodic = bool(atoms.pbc.all())

        def build_graph(atoms=atoms, z_table=z_table):
            return collate(to_data([atoms], z_table, cfg["r_max"]), device)

        batch = build_graph()
        n_edges = int(batch["edge_index"].shape[1])
        model = build_model(cfg, zs, avg_num_neighbors=n_edges / len(atoms)).to(device)
        model.eval()
        params = n_params(model)

        def model_step(batch=batch, model=model, periodic=periodic):
            # a fresh dict each call: with stress, mace replaces batch["positions"] by the strained positions
            return model(dict(batch), training=False, compute_force=True, compute_stress=periodic)

        def full_step(model=model, periodic=periodic):
            return model(build_graph(), training=False, compute_force=True, compute_stress=periodic)

        results.append(measure_infer(entry.get("name", entry["path"]), len(atoms), n_edges, model_step, build_graph,
                                     full_step, warmup, steps, synchronizer(device)))
    return result("mace", VERSIONS, request, _described(cfg, params), warmup, steps, results, device)


def train_step(request: dict) -> dict:
    """Seconds per optimiser step (forces in the loss, energy 1 : forces 100) on batches of each file."""
    setup_torch(request)
    device = resolve_device(request, "mace")
    cfg = model_config(request)
    warmup, steps = int(request.get("warmup", 2)), int(request.get("steps", 5))
    results, params = [], None
    for entry in request["structures"]:
        frames, bs = read_frames(entry)
        zs = sorted({int(z) for a in frames for z in a.numbers})
        z_table = AtomicNumberTable(zs)
        graphs = to_data(frames, z_table, cfg["r_max"])
        batches = [collate(graphs[k:k + bs], device) for k in range(0, len(graphs) - bs + 1, bs)]
        n_edges = sum(int(g.edge_index.shape[1]) for g in graphs)
        n_atoms = sum(len(a) for a in frames)
        model = build_model(cfg, zs, avg_num_neighbors=n_edges / n_atoms).to(device)
        model.train()
        params = n_params(model)
        loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0)
        opt = torch.optim.AdamW(model.parameters(), lr=float(request.get("lr", 0.01)), amsgrad=True)
        counter = {"k": 0}

        def step(batches=batches, model=model, loss_fn=loss_fn, opt=opt, counter=counter):
            batch = batches[counter["k"] % len(batches)]
            counter["k"] += 1
            opt.zero_grad(set_to_none=True)
            out = model(batch, training=True, compute_force=True, compute_stress=False)
            loss = loss_fn(_Ref(batch), out)
            loss.backward()
            opt.step()

        results.append(train_entry(entry.get("name", entry["path"]), bs, n_atoms / len(frames) * bs,
                                   time_steps(step, warmup, steps, synchronizer(device))))
    return result("mace", VERSIONS, request, _described(cfg, params), warmup, steps, results, device)


class _Ref(dict):
    """A batch dict that also answers attribute access, as mace's loss functions expect."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc


def _train_equal_time(request: dict) -> dict:
    from mace_train import train_equal_time

    return train_equal_time(request)


def main(request: dict) -> dict:
    return dispatch(request, {"infer": infer, "train_step": train_step, "train_equal_time": _train_equal_time})


if __name__ == "__main__":
    run(main)
