"""The Facet model end to end (float64): symmetry, the spline/MLP and grid/gate switches, training, configs."""

from __future__ import annotations

import ase
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation
from torch_geometric.data import Batch

from potentials.conf import CONFIG_DIR
from potentials.graph import AtomicGraph
from potentials.models.facet import Facet
from potentials.models.facet.radial import BesselMLPRadial, SplineRadial
from potentials.potential import Potential
from tests.test_model_contract import _bulk as _alloy
from tests.test_model_contract import _molecule, _rotated

CUTOFF = 4.0
CONF = CONFIG_DIR / "model"
VARIANTS = [("spline", "grid"), ("spline", "gate"), ("mlp", "grid"), ("mlp", "gate")]


def _model(radial: str = "spline", self_interaction: str = "grid", lmax: int = 2, **kw) -> Facet:
    torch.manual_seed(0)
    return Facet(cutoff=CUTOFF, avg_num_neighbors=12.0, channels=8, lmax=lmax, num_layers=3, n_knots=8,
                 radial=radial, self_interaction=self_interaction, radial_mlp_hidden=(16,), **kw)


def _evaluate(model: Facet, atoms: ase.Atoms) -> dict[str, np.ndarray]:
    potential = Potential(model, CUTOFF).double()
    batch = Batch.from_data_list([AtomicGraph.from_atoms(atoms, CUTOFF, dtype=torch.float64)])
    out = potential(batch, compute_forces=True, compute_stress=bool(atoms.pbc.all()))
    return {k: v.detach().numpy() for k, v in out.items()}



@pytest.mark.parametrize("radial,self_interaction", VARIANTS)
def test_rotation_and_inversion(radial, self_interaction):
    """Gate variants are exact to round-off; the grid is exact under inversion and within its bound otherwise."""
    model = _model(radial, self_interaction)
    exact = self_interaction == "gate"
    for make in (_alloy, _molecule):
        atoms = make()
        ref = _evaluate(model, atoms)
        f_scale = np.abs(ref["forces"]).max()
        assert f_scale > 1e-4
        for seed in range(2):
            rot = Rotation.random(random_state=seed).as_matrix()
            for matrix, tol in ((rot, 1e-12 if exact else 1e-4), (-rot, 1e-12 if exact else 1e-4), (-np.eye(3), 1e-12)):
                out = _evaluate(model, _rotated(atoms, matrix))
                np.testing.assert_allclose(out["energy"], ref["energy"], rtol=1e-12 if exact else 1e-7)
                np.testing.assert_allclose(out["forces"], ref["forces"] @ matrix.T, atol=tol * f_scale)
                if atoms.pbc.all():
                    expected = matrix @ ref["stress"][0] @ matrix.T
                    np.testing.assert_allclose(out["stress"][0], expected, atol=tol * np.abs(expected).max())


def test_lmax1_default_grid_force_error_is_small():
    """The benchmark configuration (lmax 1, default 6-ring grid): forces rotate within 1e-4 relative."""
    model = _model(lmax=1)
    atoms = _alloy().repeat((2, 1, 1))
    ref = _evaluate(model, atoms)
    worst = 0.0
    for seed in range(4):
        rot = Rotation.random(random_state=10 + seed).as_matrix()
        out = _evaluate(model, _rotated(atoms, rot))
        worst = max(worst, np.abs(out["forces"] - ref["forces"] @ rot.T).max() / np.abs(ref["forces"]).max())
    assert worst < 1e-4


def test_switches_select_the_components():
    spline_grid, mlp_gate = _model("spline", "grid"), _model("mlp", "gate")
    assert isinstance(spline_grid.radial, SplineRadial) and isinstance(mlp_gate.radial, BesselMLPRadial)
    assert type(spline_grid.layers[0].act).__name__ == "SphereGridActivation"
    assert type(mlp_gate.layers[0].act).__name__ == "GateActivation"
    # the last interaction only produces scalars: no grid there
    assert isinstance(spline_grid.layers[-1].act, torch.nn.SiLU)
    n_spline = sum(p.numel() for p in spline_grid.radial.parameters())
    n_mlp = sum(p.numel() for p in mlp_gate.radial.parameters())
    assert n_spline < n_mlp


def test_model_reads_only_the_contract_fields():
    model = _model().double()
    graph = AtomicGraph.from_atoms(_molecule(), CUTOFF, dtype=torch.float64)
    j, i = graph.edge_index
    minimal = type("G", (), {})()
    minimal.z, minimal.edge_index = graph.z, graph.edge_index
    minimal.edge_vec = graph.pos[j] - graph.pos[i]
    minimal.batch = torch.zeros(len(graph.z), dtype=torch.long)
    out = model(minimal)
    assert out.shape == (len(graph.z),) and out.dtype == torch.float64


def test_float32_model_runs_in_float32():
    model = _model(lmax=1)
    graph = AtomicGraph.from_atoms(_alloy(), CUTOFF)
    out = Potential(model, CUTOFF)(Batch.from_data_list([graph]))
    assert out["energy"].dtype == torch.float32 and torch.isfinite(out["forces"]).all()


@pytest.mark.parametrize("radial,self_interaction", [("spline", "grid"), ("mlp", "gate")])
def test_force_training_reaches_every_parameter(radial, self_interaction):
    """A loss on forces needs the double backward through splines, tensor product and grid."""
    model = _model(radial, self_interaction, lmax=1).double()
    potential = Potential(model, CUTOFF).double().train()
    batch = Batch.from_data_list([AtomicGraph.from_atoms(_alloy(), CUTOFF, dtype=torch.float64)])
    out = potential(batch, compute_forces=True, compute_stress=True)
    loss = out["forces"].pow(2).sum() + out["stress"].pow(2).sum()
    loss.backward()
    last_bias = f"readout.{len(model.readout) - 1}.bias"
    for name, p in model.named_parameters():
        if name.startswith("embedding") or name == last_bias or not p.requires_grad:
            continue  # rows of absent elements and a constant energy shift get no force gradient
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    coefficients = model.radial.spline.coefficients if radial == "spline" else None
    if coefficients is not None:
        # rows past the largest neighbour distance of the cell cannot get a gradient; the others must
        assert (coefficients.grad.abs().sum(1) > 0).sum() >= 4


@pytest.mark.parametrize("name", ["facet", "facet_mptrj"])
def test_hydra_configs_instantiate(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    root = OmegaConf.create({"cutoff": 5.0, "data_stats": {"avg_num_neighbors": 30.0}, "model": cfg})
    model = instantiate(root.model)
    assert isinstance(model, Facet) and model.cutoff == 5.0
    assert model.layers[0].norm == pytest.approx(1 / 30.0)


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="radial must be"):
        _model(radial="bessel")
    with pytest.raises(ValueError, match="self_interaction must be"):
        _model(self_interaction="tp")
    with pytest.raises(ValueError, match="num_layers"):
        Facet(cutoff=CUTOFF, num_layers=0)


def test_shipped_preset_rotation_error():
    """``model=facet`` exactly as configured (lmax 2, 64 channels, default grid) keeps forces and stress within
    1e-4 of exact rotation equivariance."""
    cfg = OmegaConf.load(CONF / "facet.yaml")
    root = OmegaConf.create({"cutoff": CUTOFF, "data_stats": {"avg_num_neighbors": 12.0}, "model": cfg})
    torch.manual_seed(0)
    model = instantiate(root.model)
    assert model.lmax == 2 and cfg.grid_resolution is None
    worst = 0.0
    for atoms in (_alloy(), _molecule()):
        ref = _evaluate(model, atoms)
        for seed in range(2):
            rot = Rotation.random(random_state=seed).as_matrix()
            out = _evaluate(model, _rotated(atoms, rot))
            worst = max(worst, np.abs(out["forces"] - ref["forces"] @ rot.T).max() / np.abs(ref["forces"]).max())
            if atoms.pbc.all():
                expected = rot @ ref["stress"][0] @ rot.T
                worst = max(worst, np.abs(out["stress"][0] - expected).max() / np.abs(expected).max())
    print(f"\nmodel=facet preset: relative rotation error of forces and stress {worst:.1e}")
    assert 0.0 < worst < 1e-4
