"""fairchem worker: runs inside benchmarks/.venvs/fairchem (fairchem-core 2.24.0), eSCN-MD backbone.

Request keys (JSON):
    task: "infer" | "train_step"
    structures: [{"name": str, "path": extxyz, "batch_size": int (train_step, default 1)}]
    model: {"sphere_channels": 64, "hidden_channels": 64, "edge_channels": 64, "num_distance_basis": 64,
            "lmax": 2, "mmax": 2, "num_layers": 2, "cutoff": 5.0, "max_neighbors": 300,
            "forces": "conservative" | "direct", "act_type": "gate" | "s2", "ff_type": "grid" | "spectral"}
    dtype, threads, warmup, steps, seed, device (cpu, cuda or auto): as for every worker.

The model is ``fairchem.core.models.uma.escn_md.eSCNMDBackbone`` (the UMA backbone without mixture of
linear experts, dataset embedding off) with ``MLP_EFS_Head`` (conservative: forces and stress by autograd)
or ``MLP_Energy_Head`` + ``Linear_Force_Head`` (direct forces, no stress), random weights.
Graphs: fairchem's own ``generate_graph`` (radius_graph_pbc v2, the default of its inference path), built on the
request's device: the AtomicData is moved there first (``AtomicData.to``), as fairchem's predict path does.
"""

from __future__ import annotations

import ase.io
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
from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch
from fairchem.core.graph.compute import generate_graph
from fairchem.core.models.uma.escn_md import (
    Linear_Force_Head,
    MLP_EFS_Head,
    MLP_Energy_Head,
    eSCNMDBackbone,
)

VERSIONS = ("fairchem-core", "torch", "e3nn", "ase", "numpy")
DEFAULTS = {"sphere_channels": 64, "hidden_channels": 64, "edge_channels": 64, "num_distance_basis": 64,
            "lmax": 2, "mmax": 2, "num_layers": 2, "cutoff": 5.0, "max_neighbors": 300,
            "forces": "conservative", "act_type": "gate", "ff_type": "grid"}


class EnergyForceModel(torch.nn.Module):
    """Backbone plus heads; returns {"energy": [B], "forces": [N,3], "stress": [B,9] (conservative, periodic)}."""

    def __init__(self, cfg: dict, periodic: bool):
        super().__init__()
        direct = cfg["forces"] == "direct"
        if cfg["forces"] not in ("direct", "conservative"):
            raise ValueError(f"model.forces must be 'direct' or 'conservative', got {cfg['forces']!r}")
        self.backbone = eSCNMDBackbone(
            sphere_channels=int(cfg["sphere_channels"]),
            hidden_channels=int(cfg["hidden_channels"]),
            edge_channels=int(cfg["edge_channels"]),
            num_distance_basis=int(cfg["num_distance_basis"]),
            lmax=int(cfg["lmax"]),
            mmax=int(cfg["mmax"]),
            num_layers=int(cfg["num_layers"]),
            act_type=str(cfg["act_type"]),
            ff_type=str(cfg["ff_type"]),
            cutoff=float(cfg["cutoff"]),
            max_neighbors=int(cfg["max_neighbors"]),
            otf_graph=True,
            direct_forces=direct,
            regress_forces=True,
            regress_stress=periodic and not direct,
            use_dataset_embedding=False,
            always_use_pbc=False,
        )
        if direct:
            self.heads = torch.nn.ModuleList([MLP_Energy_Head(self.backbone), Linear_Force_Head(self.backbone)])
        else:
            self.heads = torch.nn.ModuleList([MLP_EFS_Head(self.backbone, wrap_property=False)])

    def forward(self, data: AtomicData) -> dict:
        emb = self.backbone(data)
        out = {}
        for head in self.heads:
            res = head(data, emb)
            out.update(res if isinstance(res, dict) else {"forces": res})
        return {k: v for k, v in out.items() if k in ("energy", "forces", "stress")}


def model_config(request: dict) -> dict:
    return {**DEFAULTS, **request.get("model", {})}


def to_data(atoms: ase.Atoms, dtype: torch.dtype, device: torch.device | str = "cpu") -> AtomicData:
    """One AtomicData without edges (fairchem builds them itself), its tensors on ``device``."""
    return AtomicData.from_ase(atoms, r_edges=False, target_dtype=dtype).to(device)


def attach_graph(data: AtomicData, cfg: dict) -> int:
    """Build the radius graph with fairchem's generate_graph and store it on ``data``; return the edge count."""
    graph = generate_graph(data, cutoff=float(cfg["cutoff"]), max_neighbors=int(cfg["max_neighbors"]),
                           enforce_max_neighbors_strictly=False, radius_pbc_version=2, pbc=data.pbc)
    data.edge_index = graph["edge_index"]
    data.cell_offsets = graph["cell_offsets"].to(data.pos.dtype)
    data.nedges = graph["neighbors"].long()
    return int(graph["edge_index"].shape[1])


def n_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def infer(request: dict) -> dict:
    """E+F+S per step: model on a prebuilt graph, graph building alone, and both (fairchem's otf path)."""
    dtype = setup_torch(request)
    device = resolve_device(request, "fairchem")
    cfg = model_config(request)
    warmup, steps = int(request.get("warmup", 3)), int(request.get("steps", 10))
    results, params = [], None
    for entry in request["structures"]:
        atoms = ase.io.read(entry["path"], index=0)
        periodic = bool(atoms.pbc.all())
        model = EnergyForceModel(cfg, periodic).to(device)
        model.eval()
        params = n_params(model)
        data = to_data(atoms, dtype, device)
        n_edges = attach_graph(data, cfg)

        def model_step(data=data, model=model):
            model.backbone.otf_graph = False
            return model(data)

        def build_graph(atoms=atoms):
            d = to_data(atoms, dtype, device)
            attach_graph(d, cfg)
            return d

        def full_step(atoms=atoms, model=model):
            model.backbone.otf_graph = True
            return model(to_data(atoms, dtype, device))

        results.append(measure_infer(entry.get("name", entry["path"]), len(atoms), n_edges, model_step, build_graph,
                                     full_step, warmup, steps, synchronizer(device)))
    return result("fairchem", VERSIONS, request, {**cfg, "n_params": params}, warmup, steps, results, device)


def train_step(request: dict) -> dict:
    """Seconds per optimiser step (loss: per-atom energy MSE + 100 × force MSE), graphs prebuilt."""
    dtype = setup_torch(request)
    device = resolve_device(request, "fairchem")
    cfg = model_config(request)
    warmup, steps = int(request.get("warmup", 2)), int(request.get("steps", 5))
    results, params = [], None
    for entry in request["structures"]:
        frames, bs = read_frames(entry)
        batches = []
        for k in range(0, len(frames) - bs + 1, bs):
            batch = atomicdata_list_to_batch([to_data(a, dtype) for a in frames[k:k + bs]]).to(device)
            attach_graph(batch, cfg)
            batches.append(batch)
        model = EnergyForceModel(cfg, periodic=False).to(device)
        model.backbone.otf_graph = False
        model.train()
        params = n_params(model)
        opt = torch.optim.AdamW(model.parameters(), lr=float(request.get("lr", 5e-4)))
        counter = {"k": 0}

        def step(batches=batches, model=model, opt=opt, counter=counter):
            batch = batches[counter["k"] % len(batches)]
            counter["k"] += 1
            opt.zero_grad(set_to_none=True)
            out = model(batch)
            e_err = (out["energy"].view(-1) - batch.energy.view(-1)) / batch.natoms
            loss = (e_err ** 2).mean() + 100.0 * ((out["forces"] - batch.forces) ** 2).mean()
            loss.backward()
            opt.step()

        results.append(train_entry(entry.get("name", entry["path"]), bs, sum(len(a) for a in frames) / len(frames) * bs,
                                   time_steps(step, warmup, steps, synchronizer(device))))
    return result("fairchem", VERSIONS, request, {**cfg, "n_params": params}, warmup, steps, results, device)


def main(request: dict) -> dict:
    return dispatch(request, {"infer": infer, "train_step": train_step})


if __name__ == "__main__":
    run(main)
