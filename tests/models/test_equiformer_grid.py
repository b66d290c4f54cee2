"""EquiformerV2 S² grids: exact quadrature for band-limited signals, the activation's quadrature error against the
resolution, and the whole model's rotation error at the default resolution (forces and stress through Potential)."""

from __future__ import annotations

import ase.build
import numpy as np
import pytest
import torch
import yaml
from e3nn import o3
from scipy.spatial.transform import Rotation
from torch_geometric.data import Batch

from potentials.conf import CONFIG_DIR
from potentials.graph import AtomicGraph
from potentials.models.equiformer import EquiformerV2
from potentials.models.equiformer.grid import S2Grid, SeparableS2Activation
from potentials.models.equiformer.so3 import EdgeLayout, num_coefficients, wigner_blocks, wigner_cg_tables
from potentials.potential import Potential

CUTOFF = 4.0


def _wigner(rot: torch.Tensor, lmax: int) -> torch.Tensor:
    blocks = wigner_blocks(rot, lmax, wigner_cg_tables(lmax))
    return torch.stack([torch.block_diag(*[b[i] for b in blocks]) for i in range(rot.shape[0])])


@pytest.mark.parametrize("lmax,mmax", [(3, 3), (4, 2)])
def test_grid_round_trip_is_identity_at_the_minimal_resolution(lmax, mmax):
    index = EdgeLayout(lmax, mmax).full_index if mmax < lmax else torch.arange(num_coefficients(lmax))
    grid = S2Grid(lmax, index, lmax + 1, 2 * mmax + 1)
    x = torch.randn(5, len(index), 3, dtype=torch.float64)
    torch.testing.assert_close(grid.from_grid(grid.to_grid(x)), x, atol=1e-12, rtol=0)


def _activation_error(lmax: int, res_beta: int, res_alpha: int, n: int = 24) -> float:
    """max |act(D x) − D act(x)| / max |act(x)| for unit-variance coefficients and random rotations."""
    gen = torch.Generator().manual_seed(0)
    act = SeparableS2Activation(S2Grid(lmax, torch.arange(num_coefficients(lmax)), res_beta, res_alpha))
    x = torch.randn(n, num_coefficients(lmax), 8, generator=gen, dtype=torch.float64)
    d = _wigner(o3.rand_matrix(n, dtype=torch.float64), lmax)
    ref = act(x[:, 0], x)
    return ((act(x[:, 0], d @ x) - d @ ref).abs().max() / ref.abs().max()).item()


def test_activation_quadrature_error_falls_with_resolution():
    lmax = 2
    table = {rb: _activation_error(lmax, rb, 2 * rb) for rb in (lmax + 1, 2 * lmax + 2, 4 * lmax + 4, 8 * lmax + 8)}
    print("\nseparable S² activation, lmax=2, unit-variance inputs: res_beta → relative rotation error")
    for rb, err in table.items():
        print(f"  [{rb:2d}, {2 * rb:2d}]  {err:.1e}")
    errors = list(table.values())
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[0] > 1e-2  # the error is real (the activation is not band-limited) …
    assert errors[-1] < 1e-3 * errors[0]  # … and falls quickly with the resolution


def _bulk() -> ase.Atoms:
    rng = np.random.default_rng(0)
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[[1, 3]] = 13
    atoms.set_cell(atoms.cell.array + rng.normal(0, 0.15, (3, 3)), scale_atoms=True)
    atoms.positions += rng.normal(0, 0.12, atoms.positions.shape)
    return atoms


def _rotation_errors(potential: Potential, seeds: int = 3) -> tuple[float, float, float]:
    """Worst relative error of energy, forces and stress between a rotated cell and the rotated prediction."""
    def evaluate(atoms: ase.Atoms) -> dict:
        graph = Batch.from_data_list([AtomicGraph.from_atoms(atoms, CUTOFF, dtype=torch.float64)])
        return {k: v.detach().numpy() for k, v in potential(graph).items()}

    atoms = _bulk()
    ref = evaluate(atoms)
    err_e = err_f = err_s = 0.0
    for seed in range(seeds):
        rot = Rotation.random(random_state=seed).as_matrix()
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rot.T
        rotated.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
        out = evaluate(rotated)
        err_e = max(err_e, abs(out["energy"][0] - ref["energy"][0]) / abs(ref["energy"][0]))
        err_f = max(err_f, np.abs(out["forces"] - ref["forces"] @ rot.T).max() / np.abs(ref["forces"]).max())
        stress = rot @ ref["stress"][0] @ rot.T
        err_s = max(err_s, np.abs(out["stress"][0] - stress).max() / np.abs(stress).max())
    return err_e, err_f, err_s


def _model(lmax: int, channels: int, **kwargs) -> Potential:
    torch.manual_seed(0)
    model = EquiformerV2(cutoff=CUTOFF, avg_num_neighbors=20.0, num_layers=2, lmax=lmax, mmax=2, channels=channels,
                         attn_hidden_channels=channels, num_heads=2, attn_alpha_channels=8,
                         attn_value_channels=channels // 2, ffn_hidden_channels=channels, edge_channels=16,
                         num_basis=16, **kwargs)
    return Potential(model, CUTOFF, scale=1.0).double().eval()


@pytest.mark.parametrize("lmax,channels", [(2, 16), (2, 64), (3, 16), (3, 32)])
def test_model_rotation_error_at_default_resolution(lmax, channels):
    err_e, err_f, err_s = _rotation_errors(_model(lmax, channels))
    print(f"\nlmax={lmax}: default grids, relative rotation error E {err_e:.1e}  F {err_f:.1e}  S {err_s:.1e}")
    assert err_f < 1e-4 and err_s < 1e-4


def test_shipped_preset_rotation_error_at_default_resolution():
    """``model=equiformer_v2`` exactly as configured (lmax 2, 64 channels, 2 blocks) meets the 1e-4 target."""
    cfg = yaml.safe_load((CONFIG_DIR / "model" / "equiformer_v2.yaml").read_text())
    assert cfg.pop("_target_") == "potentials.models.equiformer.EquiformerV2"
    assert cfg["grid_resolution"] is None and cfg["edge_grid_resolution"] is None
    cfg.update(cutoff=CUTOFF, avg_num_neighbors=20.0)
    torch.manual_seed(0)  # the former lmax 3 preset gave 2.5e-4 with this seed at a 4(lmax+1) node grid
    _, err_f, err_s = _rotation_errors(Potential(EquiformerV2(**cfg), CUTOFF, scale=1.0).double().eval())
    print(f"\nmodel=equiformer_v2 preset: relative rotation error F {err_f:.1e}  S {err_s:.1e}")
    assert err_f < 1e-4 and err_s < 1e-4


@pytest.mark.parametrize("variant", ["gate", "fine-grid-mlp", "fine-grid-s2-act"])
def test_model_is_equivariant_to_round_off_without_grid_error(variant):
    """With gates (no grid), or grids fine enough, the rest of the model is exactly equivariant."""
    fine = {"grid_resolution": [32, 64], "edge_grid_resolution": [3, 48]}
    kwargs = {
        "gate": {"use_gate_act": True, "use_grid_mlp": False},
        "fine-grid-mlp": fine,
        "fine-grid-s2-act": {**fine, "use_grid_mlp": False},
    }[variant]
    err_e, err_f, err_s = _rotation_errors(_model(2, 16, **kwargs))
    assert err_e < 1e-12 and err_f < 1e-9 and err_s < 1e-9


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
def test_structure_without_edges(kernels):
    """Two atoms beyond the cutoff: no edges (zero rows for the edge activation); finite energy, zero forces."""
    atoms = ase.Atoms("CuAl", positions=[[0, 0, 0], [10, 0, 0]], cell=[20, 20, 20], pbc=True)
    graph = Batch.from_data_list([AtomicGraph.from_atoms(atoms, CUTOFF, dtype=torch.float64)])
    assert graph.edge_index.shape[1] == 0
    potential = _model(2, 8)
    potential.kernels = kernels
    out = potential(graph)
    assert torch.isfinite(out["energy"]).all()
    torch.testing.assert_close(out["forces"], torch.zeros_like(out["forces"]))
