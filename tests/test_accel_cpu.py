"""The compiled CPU kernels (potentials.accel.cpu): the same values as the reference operations, the build and its
cache, clear failures."""

from __future__ import annotations

import pytest
import torch

from potentials import accel
from potentials.accel import cpu, ops
from potentials.models.equiformer.grid import S2Grid
from potentials.models.equiformer.so3 import EdgeLayout


def _operands(dtype, rows=33, channels=70, scale=1.0):
    """Edge-frame grid of lmax 2, mmax 1 (K = 7 coefficients, 3 × 6 points); 70 channels: one full tile of 64 and a
    partial one."""
    grid = S2Grid(2, EdgeLayout(2, 1).full_index, 3, 6)
    synthesis = grid.to_grid_mat.to(dtype).contiguous()
    analysis = grid.from_grid_mat[1:].to(dtype).contiguous()
    gen = torch.Generator().manual_seed(0)
    k, ko = synthesis.shape[1], analysis.shape[0]
    x = scale * torch.randn(rows, k, channels, dtype=dtype, generator=gen)
    grad = torch.randn(rows, ko, channels, dtype=dtype, generator=gen)
    u = torch.randn(rows, k, channels, dtype=dtype, generator=gen)
    return x, grad, u, synthesis, analysis


def _kernels():
    kernels = cpu.load()
    assert kernels is not None, f"the kernels must build on this machine: {cpu.unavailable_reason()}"
    return kernels


def _tensor_path(x, grad, u, synthesis, analysis):
    """Forward, gradient and the gradient's derivatives through the reference's autograd functions."""
    x = x.clone().requires_grad_(True)
    grad = grad.clone().requires_grad_(True)
    out = ops.GridSiLU.apply(x, synthesis, analysis)
    first = ops.GridSiLUGrad.apply(x, grad, synthesis, analysis)
    second = torch.autograd.grad(first, (x, grad), u)
    return out.detach(), first.detach(), second


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_kernels_match_tensor_operations(dtype, tol, scale):
    """All three kernels against the tensor-operation path; scale 300 drives SiLU into both tails (exp clamped)."""
    x, grad, u, synthesis, analysis = _operands(dtype, scale=scale)
    kernels = _kernels()
    out, first, (second_x, second_grad) = _tensor_path(x, grad, u, synthesis, analysis)
    size = lambda t: t.abs().max().item()  # noqa: E731
    torch.testing.assert_close(kernels.forward(x, synthesis, analysis), out, rtol=tol, atol=tol * size(out))
    torch.testing.assert_close(kernels.backward(x, grad, synthesis, analysis), first, rtol=tol,
                               atol=tol * size(first))
    got_x, got_grad = kernels.double_backward(x, grad, u, synthesis, analysis)
    torch.testing.assert_close(got_x, second_x, rtol=tol, atol=tol * size(second_x))
    torch.testing.assert_close(got_grad, second_grad, rtol=tol, atol=tol * size(second_grad))
    only_x, none = kernels.double_backward(x, grad, u, synthesis, analysis, need_grad=False)
    assert none is None and torch.equal(only_x, got_x)
    none, only_grad = kernels.double_backward(x, grad, u, synthesis, analysis, need_x=False)
    assert none is None and torch.equal(only_grad, got_grad)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_grid_mlp_kernels_match_tensor_operations(dtype, tol):
    """The grid MLP's four point-wise kernels against SiLU and the projections written as tensor operations."""
    grid = S2Grid(2, torch.arange(9), 4, 8)
    synthesis = grid.to_grid_mat.to(dtype).contiguous()
    analysis = grid.from_grid_mat[1:].to(dtype).contiguous()
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, 9, 70, dtype=dtype, generator=gen)
    p = 3 * torch.randn(6, synthesis.shape[0], 70, dtype=dtype, generator=gen)
    grad_out = torch.randn(6, analysis.shape[0], 70, dtype=dtype, generator=gen)
    grad_grid = torch.randn_like(p)
    kernels = _kernels()
    silu, slope = torch.nn.functional.silu, lambda y: torch.sigmoid(y) * (1 + y * (1 - torch.sigmoid(y)))  # noqa: E731
    y = torch.matmul(synthesis, h)
    expected = {
        "to_grid": (kernels.mlp_to_grid(h, synthesis), silu(y)),
        "from_grid": (kernels.mlp_from_grid(p, analysis), torch.matmul(analysis, silu(p))),
        "from_grid_backward": (kernels.mlp_from_grid_backward(p, grad_out, analysis),
                               slope(p) * torch.matmul(analysis.T, grad_out)),
        "to_grid_backward": (kernels.mlp_to_grid_backward(h, grad_grid, synthesis),
                             torch.matmul(synthesis.T, slope(y) * grad_grid)),
    }
    for name, (got, want) in expected.items():
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m, name=name: f"{name}: {m}")


def test_kernel_exp_is_accurate_in_both_precisions():
    """SiLU through the kernel on a 1 × 1 'grid' (S = A = 1) is SiLU itself: its exp within an ulp or two."""
    one = torch.ones(1, 1)
    y = torch.linspace(-120.0, 120.0, 4801)
    for dtype, tol in [(torch.float32, 3e-7), (torch.float64, 5e-16)]:
        got = _kernels().forward(y.to(dtype).view(1, 1, -1).contiguous(), one.to(dtype), one.to(dtype))
        want = torch.nn.functional.silu(y.to(torch.float64))
        torch.testing.assert_close(got.view(-1).to(torch.float64), want, rtol=tol, atol=1e-30)


def test_kernels_reject_mismatched_operands():
    x, grad, u, synthesis, analysis = _operands(torch.float64)
    kernels = _kernels()
    with pytest.raises(ValueError, match="analysis must be a contiguous CPU torch.float64 tensor"):
        kernels.forward(x, synthesis, analysis.float())
    with pytest.raises(ValueError, match="grad must be"):
        kernels.backward(x, grad[:, :2], synthesis, analysis)
    with pytest.raises(ValueError, match="x must be"):
        kernels.forward(x.transpose(1, 2), synthesis, analysis)


def test_kernels_apply_only_to_cpu_float_tensors_of_one_dtype():
    assert cpu.supports(torch.zeros(2)) and cpu.supports(torch.zeros(2, dtype=torch.float64), torch.zeros(3, 4,
                                                                                                     dtype=torch.float64))
    assert not cpu.supports(torch.zeros(2, dtype=torch.float16))
    assert not cpu.supports(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not cpu.supports(torch.zeros(2, device="meta"))
    assert not cpu.supports()


def test_build_is_cached_and_failures_give_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("POTENTIALS_KERNEL_CACHE", str(tmp_path / "cache"))
    first = cpu.build()
    assert first.parent == tmp_path / "cache"
    stamp = first.stat().st_mtime_ns
    assert cpu.build() == first and first.stat().st_mtime_ns == stamp  # found, not rebuilt

    # a compiler error names the source and carries the compiler's message
    broken = tmp_path / "grid_kernels.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="failed on grid_kernels.cpp"):
        cpu.build()
    monkeypatch.setattr(cpu, "_state", {"lib": None, "error": None, "tried": False})
    assert cpu.load() is None and "failed on grid_kernels.cpp" in cpu.unavailable_reason()

    # no compiler: named as the reason (what "auto" and "cpu" make of it: tests/test_accel_ops.py)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu, "_state", {"lib": None, "error": None, "tried": False})
    assert cpu.load() is None
    assert "no C++ compiler found" in cpu.unavailable_reason()
    assert cpu.load() is None and cpu._state["tried"]  # tried once


def test_training_on_forces_takes_the_same_steps_with_and_without_the_kernels():
    """Four optimiser steps of an EquiformerV2 (S² activation and grid MLP) on a loss of energy, forces and stress,
    float64: the compiled path and the tensor-operation path give the same losses and parameters to round-off."""
    import ase.build
    from torch_geometric.data import Batch

    from potentials.graph import AtomicGraph
    from potentials.models.equiformer import EquiformerV2
    from potentials.potential import Potential

    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[[1, 3]] = 13
    atoms.rattle(0.1, seed=0)
    graph = Batch.from_data_list([AtomicGraph.from_atoms(atoms, 4.0, dtype=torch.float64)])

    def train(kernels: str):
        torch.manual_seed(0)
        model = EquiformerV2(cutoff=4.0, avg_num_neighbors=20.0, num_layers=2, lmax=2, mmax=2, channels=16,
                             attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8, attn_value_channels=8,
                             ffn_hidden_channels=16, edge_channels=16, num_basis=16)
        potential = Potential(model, 4.0, scale=1.0, kernels=kernels).double().train()
        optimiser = torch.optim.SGD(potential.parameters(), lr=1e-2)
        losses = []
        for _ in range(4):
            out = potential(graph)
            loss = (out["forces"] ** 2).sum() + (out["energy"] ** 2).sum() + (out["stress"] ** 2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        return torch.tensor(losses), torch.cat([p.detach().flatten() for p in potential.parameters()])

    _kernels()
    losses, params = train("cpu")
    losses_ref, params_ref = train("torch")
    assert losses[-1] < losses[0]
    torch.testing.assert_close(losses, losses_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(params, params_ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("lmax, mmax, channels", [(2, 2, 64), (3, 1, 70)])
def test_rotation_kernels_match_gather_rotation_and_sum(dtype, tol, lmax, mmax, channels):
    """The fused gather + rotation and its gradient against bmm(rot, gather_pairs(x)) through autograd, and the
    rotation back with the sum over each centre's edges against bmm(rotᵀ, msg) + index_add, with
    Wigner matrices of random edges (block-diagonal, rows of a truncated layout when mmax < lmax), nodes with
    no edges at all, a node that is its own neighbour and a channel count beyond one vector tile."""
    from potentials.models.equiformer.attention import EdgeData, gather_pairs
    from potentials.models.equiformer.so3 import EdgeRotation

    gen = torch.Generator().manual_seed(1)
    n_nodes, n_edges = 12, 80
    src = torch.randint(0, 9, (n_edges,), generator=gen)  # nodes 9 … 11 have no edges
    dst = torch.randint(0, 9, (n_edges,), generator=gen)
    dst[0] = src[0]
    rotation = EdgeRotation(lmax, mmax)
    vec = torch.randn(n_edges, 3, dtype=dtype, generator=gen).requires_grad_(True)
    rot = rotation(vec)
    x = torch.randn(n_nodes, (lmax + 1) ** 2, channels, dtype=dtype, generator=gen).requires_grad_(True)
    edge = EdgeData(src, dst, rot, None, None, n_nodes)
    want = torch.bmm(rot, gather_pairs(x, edge))
    want_pairs = want.detach()
    grad = torch.randn(want.shape, dtype=dtype, generator=gen)
    want_x, want_vec = torch.autograd.grad(want, (x, vec), grad, retain_graph=True)

    degrees = torch.tensor([l for l, _ in rotation.layout.rows])
    first, length = degrees * degrees, 2 * degrees + 1
    kernels = _kernels()
    got = kernels.rotate_pairs(x.detach(), rot.detach(), src, dst, first, length)
    torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol * want.abs().max().item())
    order, start = edge.incidence()
    got_x, got_rot = kernels.rotate_pairs_backward(x.detach(), rot.detach(), grad, order, start, first, length)
    torch.testing.assert_close(got_x, want_x, rtol=tol, atol=tol * want_x.abs().max().item())
    assert got_x[9:].abs().max() == 0
    # the rotation's gradient inside its blocks, carried on to the edge vectors by the model's own graph
    (got_vec,) = torch.autograd.grad(rot, vec, got_rot, retain_graph=True)
    torch.testing.assert_close(got_vec, want_vec, rtol=tol, atol=tol * want_vec.abs().max().item())
    # and back: the messages rotated out of the edge frames and summed into the centres (nodes 9 … 11 get none)
    msg = torch.randn(n_edges, rot.shape[1], channels, dtype=dtype, generator=gen).requires_grad_(True)
    back = torch.bmm(rot.transpose(1, 2), msg)
    want = back.new_zeros(n_nodes, *back.shape[1:]).index_add_(0, dst, back)
    grad = torch.randn(want.shape, dtype=dtype, generator=gen)
    want_msg, want_vec = torch.autograd.grad(want, (msg, vec), grad, retain_graph=True)
    got = kernels.rotate_back_sum(msg.detach(), rot.detach(), order[1].contiguous(), start[1].contiguous(), first,
                                  length)
    torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol * want.abs().max().item())
    assert got[9:].abs().max() == 0
    got_msg, got_rot = kernels.rotate_back_sum_backward(msg.detach(), rot.detach(), grad, dst, first, length)
    torch.testing.assert_close(got_msg, want_msg, rtol=tol, atol=tol * want_msg.abs().max().item())
    (got_vec,) = torch.autograd.grad(rot, vec, got_rot)
    torch.testing.assert_close(got_vec, want_vec, rtol=tol, atol=tol * want_vec.abs().max().item())
    with pytest.raises(ValueError, match="src must be a contiguous CPU torch.int64"):
        kernels.rotate_pairs(x.detach(), rot.detach(), src.int(), dst, first, length)
    with pytest.raises(ValueError, match="row blocks .* must lie within the"):
        kernels.rotate_pairs(x.detach(), rot.detach(), src, dst, first + 1, length)
    # the model's entry point takes int32 edge indices as well
    from potentials.models.equiformer.attention import rotated_pairs

    edge32 = EdgeData(src.int(), dst.int(), rot.detach(), None, None, n_nodes)
    with accel.backend("cpu"):
        got = rotated_pairs(x.detach(), edge32, first, length)
    torch.testing.assert_close(got, want_pairs, rtol=tol, atol=tol * want_pairs.abs().max().item())
    with pytest.raises(ValueError, match="grad must be"):
        kernels.rotate_pairs_backward(x.detach(), rot.detach(), grad[:, :, :channels], order, start, first, length)


@pytest.mark.parametrize("kind", ["pairs", "back"])
def test_rotation_kernels_are_differentiable_to_second_order(kind):
    """gradcheck and gradgradcheck (float64) of the two rotations through the kernels, with the rotation matrices
    built from edge vectors as in the model (so only the entries inside the degree blocks vary): the kernels'
    gradients, and their own gradients (training on forces), are those of the functions."""
    from potentials.models.equiformer import attention
    from potentials.models.equiformer.so3 import EdgeRotation

    gen = torch.Generator().manual_seed(0)
    n_nodes, n_edges, channels = 6, 20, 3
    src = torch.randint(0, 5, (n_edges,), generator=gen)
    dst = torch.randint(0, 5, (n_edges,), generator=gen)
    rotation = EdgeRotation(2, 1).double()
    degrees = torch.tensor([l for l, _ in rotation.layout.rows])
    first, length = degrees * degrees, 2 * degrees + 1
    vec = torch.randn(n_edges, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    rows = rotation.layout.num_rows
    values = torch.randn(*((n_nodes, 9) if kind == "pairs" else (n_edges, rows)), channels, dtype=torch.float64,
                         generator=gen).requires_grad_(True)
    apply = attention.rotated_pairs if kind == "pairs" else attention.rotated_back_sum
    calls = []

    def fn(values, vec):
        calls.append(1)
        edge = attention.EdgeData(src, dst, rotation(vec), None, None, n_nodes)
        with accel.backend("cpu"):  # the kernels, or an error
            return apply(values, edge, first, length)

    _kernels()
    assert torch.autograd.gradcheck(fn, (values, vec))
    assert torch.autograd.gradgradcheck(fn, (values, vec))
    assert calls


def test_build_falls_back_to_portable_flags_and_rebuilds_a_broken_library(monkeypatch, tmp_path):
    """A compiler that rejects -march=native gets a build without it; a cached library that no longer loads is
    rebuilt; an unusable cache folder is named with the variable that moves it."""
    import shutil
    import stat

    real = shutil.which("c++")
    assert real, "the kernel tests need a C++ compiler (c++)"
    fussy = tmp_path / "fussy-c++"
    fussy.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec {real} "$@"\n')
    fussy.chmod(fussy.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(fussy))
    monkeypatch.setenv("POTENTIALS_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_state", {"lib": None, "error": None, "tried": False})
    path = cpu.build()
    assert path.exists()
    path.write_bytes(b"not a library")  # e.g. built by another machine's compiler
    kernels = cpu.load()
    assert kernels is not None, cpu.unavailable_reason()
    x, _, _, synthesis, analysis = _operands(torch.float64, rows=3, channels=5)
    want = ops.s2_activation.reference(x, synthesis, analysis)
    torch.testing.assert_close(kernels.forward(x, synthesis, analysis), want, rtol=1e-13, atol=1e-13)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("POTENTIALS_KERNEL_CACHE", str(blocker / "kernels"))
    with pytest.raises(RuntimeError, match="POTENTIALS_KERNEL_CACHE"):
        cpu.build()
