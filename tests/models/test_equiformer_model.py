"""EquiformerV2 as a whole: configs and paper parameter counts, direct forces, edge cases, training mode."""

from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase.optimize import FIRE
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation
from torch_geometric.data import Batch, Data

from potentials.calculator import PotentialCalculator
from potentials.conf import CONFIG_DIR
from potentials.graph import AtomicGraph
from potentials.models.base import EnergyModel
from potentials.models.equiformer import EquiformerV2
from potentials.potential import Potential

CONF = CONFIG_DIR / "model"
CUTOFF = 4.0
SMALL = dict(num_layers=2, lmax=2, mmax=1, channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
             attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8, num_basis=8)


def _config(name: str, **overrides) -> EquiformerV2:
    cfg = OmegaConf.merge(
        {"cutoff": 12.0, "data_stats": {"avg_num_neighbors": 20.0}},
        {"model": OmegaConf.load(CONF / f"{name}.yaml")},
        {"model": overrides},
    )
    return instantiate(cfg.model)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,paper", [("equiformer_v2_31M", 31e6), ("equiformer_v2_83M", 83e6)])
def test_paper_presets_have_the_papers_parameter_counts(name, paper):
    """The paper's OC20 models (with their direct force head): 31 M and 83 M parameters.

    Differences by construction, both < 0.5 %: 119 element embeddings instead of 90 (+0.08 / +0.11 M), and an
    energy head without the paper's l > 0 weights that never reach the energy (−0.13 / −0.16 M).
    """
    model = _config(name)
    assert model.direct_forces and model.cutoff == 12.0
    assert abs(_count(model) - paper) / paper < 0.01
    conservative = _config(name, direct_forces=False)
    assert _count(conservative) < 0.95 * _count(model)


def test_default_config_builds_and_runs():
    model = _config("equiformer_v2")
    assert (model.lmax, model.mmax, model.direct_forces, len(model.blocks)) == (2, 2, False, 2)
    graph = _batch([ase.build.molecule("H2O")], CUTOFF, dtype=torch.float32)
    graph.edge_vec = graph.pos[graph.edge_index[0]] - graph.pos[graph.edge_index[1]]
    assert model(graph).shape == (3,)


def _batch(structures: list[ase.Atoms], cutoff: float = CUTOFF, dtype: torch.dtype = torch.float64) -> Batch:
    return Batch.from_data_list([AtomicGraph.from_atoms(a, cutoff, dtype=dtype) for a in structures])


def _potential(**kwargs) -> Potential:
    torch.manual_seed(0)
    model = EquiformerV2(cutoff=CUTOFF, avg_num_neighbors=8.0, **{**SMALL, **kwargs})
    return Potential(model, CUTOFF, atomic_energies={29: -1.0, 13: -2.0, 8: -3.0, 1: -0.5}, scale=1.3).double()


def test_direct_force_head_returns_rotating_forces_and_drives_ase():
    potential = _potential(direct_forces=True, use_gate_act=True, use_grid_mlp=False).eval()
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[[0, 2]] = 13
    atoms.rattle(0.1, seed=3)
    model_out = potential.model(_with_edge_vec(_batch([atoms])))
    assert set(model_out) == {"node_energy", "forces"} and model_out["forces"].shape == (4, 3)
    out = potential(_batch([atoms]))
    torch.testing.assert_close(out["forces"], 1.3 * model_out["forces"])  # the direct forces, not −∂E/∂r
    grad_forces = Potential(_GradientOnly(potential.model), CUTOFF, scale=1.3).double()(_batch([atoms]))["forces"]
    assert (out["forces"] - grad_forces).abs().max() > 1e-6  # non-conservative: differs from −∂E/∂r
    rot = torch.tensor(Rotation.random(random_state=1).as_matrix())
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rot.numpy().T
    rotated.set_cell(atoms.cell.array @ rot.numpy().T, scale_atoms=False)
    torch.testing.assert_close(potential(_batch([rotated]))["forces"], out["forces"] @ rot.T, atol=1e-10, rtol=0)
    atoms.calc = PotentialCalculator(potential, dtype="float64")
    start = atoms.positions.copy()
    np.testing.assert_allclose(atoms.get_forces(), out["forces"].detach().numpy(), atol=1e-10)
    FIRE(atoms, logfile=None).run(fmax=1e-6, steps=5)
    assert np.isfinite(atoms.positions).all() and np.abs(atoms.positions - start).max() > 1e-4


class _GradientOnly(EnergyModel):
    """The same model's energy alone, so that Potential differentiates it."""

    def __init__(self, model: EquiformerV2) -> None:
        super().__init__(model.cutoff)
        self.model = model

    def forward(self, graph):
        return self.model(graph)["node_energy"]


def _with_edge_vec(graph: Batch) -> Batch:
    j, i = graph.edge_index
    graph.edge_vec = graph.pos[j] + graph.cell_offsets @ graph.cell[0] - graph.pos[i]
    return graph


def test_edges_along_axes_zero_length_and_no_edges():
    potential = _potential().eval()
    # a molecule whose bonds lie exactly along ±x, ±y, ±z
    atoms = ase.Atoms("OH6", positions=[[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1],
                                        [0, 0, -1]])
    out = potential(_batch([atoms]), compute_stress=False)
    assert torch.isfinite(out["forces"]).all() and out["forces"].abs().max() > 1e-6
    # by symmetry the central atom feels no force
    assert out["forces"][0].abs().max() < 1e-10
    # a zero-length edge (two atoms on the same site) stays finite
    graph = Data(z=torch.tensor([29, 29]), edge_index=torch.tensor([[0, 1], [1, 0]]),
                 edge_vec=torch.zeros(2, 3, dtype=torch.float64, requires_grad=True),
                 batch=torch.zeros(2, dtype=torch.long))
    energy = potential.model(graph).sum()
    (grad,) = torch.autograd.grad(energy, graph.edge_vec)
    assert torch.isfinite(energy) and torch.isfinite(grad).all()
    # an isolated atom: no edges at all
    isolated = potential(_batch([ase.Atoms("Cu")]), compute_stress=False)
    assert isolated["forces"].abs().max() == 0.0


def test_float32_and_training_mode_with_force_gradients():
    torch.manual_seed(0)
    model = EquiformerV2(cutoff=CUTOFF, avg_num_neighbors=8.0, alpha_drop=0.1, drop_path=0.1, **SMALL)
    potential = Potential(model, CUTOFF).float().train()
    structures = [ase.build.bulk("Cu", "fcc", a=3.7, cubic=True), ase.build.molecule("H2O")]
    structures[0].rattle(0.05, seed=0)
    out = potential(_batch(structures, dtype=torch.float32), compute_stress=False)
    assert out["energy"].dtype == torch.float32 and out["forces"].dtype == torch.float32
    loss = out["forces"].pow(2).mean() + out["energy"].pow(2).mean()
    loss.backward()  # second derivatives: training on forces
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attention.conv_1.fc_m[0].weight.grad.abs().max() > 0
    potential.eval()
    eval_a = potential(_batch(structures, dtype=torch.float32), compute_stress=False)["energy"]
    eval_b = potential(_batch(structures, dtype=torch.float32), compute_stress=False)["energy"]
    torch.testing.assert_close(eval_a, eval_b)  # no dropout at evaluation


def test_rejects_too_coarse_grid():
    with pytest.raises(ValueError, match="too coarse"):
        EquiformerV2(cutoff=CUTOFF, lmax=3, mmax=2, grid_resolution=[3, 8])
