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
from potentials.models.equiformer.grid import (
    GridMLP,
    GridMLPCore,
    GridSiLU,
    GridSiLUGrad,
    S2Grid,
    SeparableS2Activation,
)
from potentials.models.equiformer.so3 import EdgeLayout, num_coefficients, wigner_blocks, wigner_cg_tables
from potentials.nn import native
from potentials.nn.sphere_grid import sphere_grid
from potentials.potential import Potential

CUTOFF = 4.0


def _wigner(rot: torch.Tensor, lmax: int) -> torch.Tensor:
    blocks = wigner_blocks(rot, lmax, wigner_cg_tables(lmax))
    return torch.stack([torch.block_diag(*[b[i] for b in blocks]) for i in range(rot.shape[0])])


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_quadrature_is_exact_for_products_of_harmonics(axis):
    lmax = 4
    points, weights = sphere_grid(lmax + 1, 2 * lmax + 1, polar_axis=axis)
    torch.testing.assert_close(points.norm(dim=-1), torch.ones(len(points), dtype=torch.float64))
    sh = o3.spherical_harmonics(list(range(lmax + 1)), points, normalize=True, normalization="component")
    gram = sh.T @ (sh * weights[:, None])  # (1/4π)∫ Y Y dΩ = identity in component normalisation
    torch.testing.assert_close(gram, torch.eye(num_coefficients(lmax), dtype=torch.float64), atol=1e-13, rtol=0)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


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
    """``model=equiformer_v2`` exactly as configured (lmax 3, 32 channels, 3 blocks) meets the 1e-4 target."""
    cfg = yaml.safe_load((CONFIG_DIR / "model" / "equiformer_v2.yaml").read_text())
    assert cfg.pop("_target_") == "potentials.models.equiformer.EquiformerV2"
    assert cfg["grid_resolution"] is None and cfg["edge_grid_resolution"] is None
    cfg.update(cutoff=CUTOFF, avg_num_neighbors=20.0)
    torch.manual_seed(0)  # at the coarser 4(lmax+1) node grid this seed gave a force error of 2.5e-4
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


@pytest.mark.parametrize("path", ["compiled kernel", "tensor operations"])
def test_chunked_grid_silu_gradients_and_second_derivatives(monkeypatch, path):
    """The activation (the compiled kernel, or chunked tensor operations: grid values recomputed in the backward
    pass) against the plain composition."""
    if path == "tensor operations":
        monkeypatch.setitem(native._state, "disabled", 1)
    else:
        assert native.grid_kernels(torch.zeros(1, dtype=torch.float64)) is not None, native.unavailable_reason()
    calls = _spy_kernels(monkeypatch)
    grid = S2Grid(3, EdgeLayout(3, 2).full_index, 4, 10)
    synthesis, analysis = grid.to_grid_mat, grid.from_grid_mat[1:]
    monkeypatch.setattr(GridSiLU, "CHUNK_VALUES", 5 * synthesis.shape[0])  # 21 rows in 5 chunks of 4–5
    x = torch.randn(7, synthesis.shape[1], 3, dtype=torch.float64, requires_grad=True)
    plain = torch.matmul(analysis, torch.nn.functional.silu(torch.matmul(synthesis, x)))
    torch.testing.assert_close(GridSiLU.apply(x, synthesis, analysis), plain)
    grad = torch.randn_like(plain)
    (expected,) = torch.autograd.grad(plain, x, grad)
    (chunked,) = torch.autograd.grad(GridSiLU.apply(x, synthesis, analysis), x, grad)  # the chunked backward
    torch.testing.assert_close(chunked, expected)
    assert torch.autograd.gradcheck(lambda t: GridSiLU.apply(t, synthesis, analysis), (x,))
    assert torch.autograd.gradgradcheck(lambda t: GridSiLU.apply(t, synthesis, analysis), (x,))
    # second derivatives (the chunked backward of the backward) against the plain composition's
    plain = torch.matmul(analysis, torch.nn.functional.silu(torch.matmul(synthesis, x)))
    (first,) = torch.autograd.grad(GridSiLU.apply(x, synthesis, analysis), x, grad, create_graph=True)
    grad.requires_grad_(True)
    (first_plain,) = torch.autograd.grad(plain, x, grad, create_graph=True)
    probe = torch.randn_like(first)
    got = torch.autograd.grad((GridSiLUGrad.apply(x, grad, synthesis, analysis) * probe).sum(), (x, grad))
    want = torch.autograd.grad((first_plain * probe).sum(), (x, grad))
    torch.testing.assert_close(first, first_plain)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # the gradient function itself: first derivatives chunked, second ones (a third derivative) plain
    assert torch.autograd.gradcheck(lambda t, g: GridSiLUGrad.apply(t, g, synthesis, analysis), (x, grad))
    assert torch.autograd.gradgradcheck(lambda t, g: GridSiLUGrad.apply(t, g, synthesis, analysis), (x, grad))
    used = {"forward", "backward", "double_backward"} if path == "compiled kernel" else set()
    assert {name for name, n in calls.items() if n} == used


@pytest.mark.parametrize("path", ["compiled kernel", "tensor operations"])
def test_chunked_grid_mlp_gradients_and_second_derivatives(monkeypatch, path):
    """The grid MLP's chunked core (grid values recomputed in the backward pass; its point-wise steps in the compiled
    kernels, or tensor operations) against the plain composition."""
    if path == "tensor operations":
        monkeypatch.setitem(native._state, "disabled", 1)
    else:
        assert native.grid_kernels(torch.zeros(1, dtype=torch.float64)) is not None, native.unavailable_reason()
    grid = S2Grid(2, torch.arange(9), 3, 6)
    synthesis, analysis = grid.to_grid_mat, grid.from_grid_mat[1:]
    monkeypatch.setattr(GridSiLU, "CHUNK_VALUES", 2 * synthesis.shape[0] * 4)  # 5 nodes in 3 chunks of 1–2
    monkeypatch.setattr(GridMLPCore, "KERNEL_CHUNK_VALUES", 2 * synthesis.shape[0] * 4)
    calls = _spy_kernels(monkeypatch)
    h = torch.randn(5, 9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def plain(h, weight):
        values = torch.nn.functional.silu(torch.nn.functional.silu(torch.matmul(synthesis, h)) @ weight.T)
        return torch.matmul(analysis, values)

    expected = plain(h, weight)
    torch.testing.assert_close(GridMLPCore.apply(h, synthesis, analysis, weight), expected)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (h, weight), grad)
    got = torch.autograd.grad(GridMLPCore.apply(h, synthesis, analysis, weight), (h, weight), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda t, w: GridMLPCore.apply(t, synthesis, analysis, w), (h, weight))
    assert torch.autograd.gradgradcheck(lambda t, w: GridMLPCore.apply(t, synthesis, analysis, w), (h, weight))
    used = {"mlp_to_grid", "mlp_from_grid", "mlp_from_grid_backward", "mlp_to_grid_backward"}
    assert {name for name, n in calls.items() if n} == (used if path == "compiled kernel" else set())


def _spy_kernels(monkeypatch) -> dict[str, int]:
    """Count the calls of every compiled-kernel method (to show which path ran)."""
    calls: dict[str, int] = {}
    for name in ("forward", "backward", "double_backward", "mlp_to_grid", "mlp_from_grid", "mlp_from_grid_backward",
                 "mlp_to_grid_backward"):
        original = getattr(native.GridKernels, name)
        calls[name] = 0

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(native.GridKernels, name, counted)
    return calls


@pytest.mark.parametrize("path", ["compiled kernel", "tensor operations"])
def test_structure_without_edges(monkeypatch, path):
    """Two atoms beyond the cutoff: no edges (zero rows for the edge activation); finite energy, zero forces."""
    if path == "tensor operations":
        monkeypatch.setitem(native._state, "disabled", 1)
    atoms = ase.Atoms("CuAl", positions=[[0, 0, 0], [10, 0, 0]], cell=[20, 20, 20], pbc=True)
    graph = Batch.from_data_list([AtomicGraph.from_atoms(atoms, CUTOFF, dtype=torch.float64)])
    assert graph.edge_index.shape[1] == 0
    out = _model(2, 8)(graph)
    assert torch.isfinite(out["energy"]).all()
    torch.testing.assert_close(out["forces"], torch.zeros_like(out["forces"]))


def test_inference_skips_the_grid_mlp_weight_gradient_training_keeps_it():
    """Forces and stress without a kept graph take the grid MLP's weight as a constant (no weight gradient is
    computed); the same call with the graph kept (training on forces) still trains that weight."""
    potential = _model(2, 8)
    graph = Batch.from_data_list([AtomicGraph.from_atoms(_bulk(), CUTOFF, dtype=torch.float64)])
    weights = [m.mlp[2].weight for m in potential.modules() if isinstance(m, GridMLP)]
    assert weights and all(w.requires_grad for w in weights)
    calls = []
    original = GridMLPCore.backward

    def spy(ctx, grad):
        calls.append(ctx.needs_input_grad[3])
        kept.append(ctx.kept is not None)
        out = original(ctx, grad)
        assert ctx.kept is None  # released by the backward pass, not held with the graph
        return out

    kept = []

    GridMLPCore.backward = staticmethod(spy)
    try:
        fast = potential(graph)
        potential.model.direct_forces = True  # Potential then keeps parameters differentiable (same outputs here)
        try:
            full = potential(graph)
        finally:
            potential.model.direct_forces = False
        assert calls == [False] * len(weights) + [True] * len(weights)
        # the kernel path keeps the pre-activations for the backward pass only without a weight gradient
        assert kept == [native.grid_kernels(graph.pos) is not None] * len(weights) + [False] * len(weights)
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(fast[key], full[key], rtol=1e-13, atol=1e-13)
        GridMLPCore.KEEP_VALUES, keep_values = 0, GridMLPCore.KEEP_VALUES  # too large to keep: recomputed
        try:
            recomputed = potential(graph)
        finally:
            GridMLPCore.KEEP_VALUES = keep_values
        assert kept[-len(weights):] == [False] * len(weights)
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(fast[key], recomputed[key], rtol=1e-13, atol=1e-13)
        calls.clear()
        out = potential(graph, create_graph=True)
        (out["forces"] ** 2).sum().backward()
        assert len(calls) >= len(weights) and all(calls)  # forces, then the loss's way back through the outputs
        assert all(w.grad is not None for w in weights)
        assert weights[0].grad.abs().sum() > 0  # (the last block's l > 0 outputs reach no energy)
    finally:
        GridMLPCore.backward = original


def test_model_files_keep_their_grids(tmp_path):
    """A model file records the resolved grids; files of format 1 (node grid 4(lmax+1) at every lmax) keep theirs."""
    from potentials.export import load, save

    config = {"_target_": "potentials.models.equiformer.EquiformerV2", "cutoff": CUTOFF, "num_layers": 1, "lmax": 3,
              "mmax": 2, "channels": 8, "attn_hidden_channels": 8, "num_heads": 2, "attn_alpha_channels": 4,
              "attn_value_channels": 4, "ffn_hidden_channels": 8, "edge_channels": 8, "num_basis": 8}
    torch.manual_seed(0)
    potential = Potential(EquiformerV2(**{k: v for k, v in config.items() if k != "_target_"}), CUTOFF)
    path = save(potential, tmp_path / "model.pt", config)
    payload = torch.load(path, weights_only=True)
    assert payload["model_config"]["grid_resolution"] == [24, 48]
    assert payload["model_config"]["edge_grid_resolution"] == [4, 24]
    assert load(path).model.node_grid.res_beta == 24
    torch.save({**payload, "format_version": 1, "model_config": config}, tmp_path / "old.pt")
    old = load(tmp_path / "old.pt")
    assert (old.model.node_grid.res_beta, old.model.node_grid.res_alpha) == (16, 32)
    assert (old.model.edge_grid.res_beta, old.model.edge_grid.res_alpha) == (4, 24)
    # lmax 2: the edge grid's default is now 3 x 14; a format-1 file keeps the 3 x 24 it was trained with
    small = {**config, "lmax": 2}
    torch.manual_seed(0)
    potential = Potential(EquiformerV2(**{k: v for k, v in small.items() if k != "_target_"}), CUTOFF)
    payload = torch.load(save(potential, tmp_path / "small.pt", small), weights_only=True)
    assert payload["model_config"]["edge_grid_resolution"] == [3, 14]
    torch.save({**payload, "format_version": 1, "model_config": small}, tmp_path / "old_small.pt")
    old = load(tmp_path / "old_small.pt")
    assert (old.model.edge_grid.res_beta, old.model.edge_grid.res_alpha) == (3, 24)
    assert (old.model.node_grid.res_beta, old.model.node_grid.res_alpha) == (12, 24)
