"""The reference operations (potentials.accel.ops) against their compiled CPU versions, and the ``kernels`` choice:
which implementation runs, the environment override, and whole models on either backend."""

from __future__ import annotations

import logging

import ase.build
import pytest
import torch
from torch_geometric.data import Batch

from potentials import accel
from potentials.accel import backends, cpu, ops
from potentials.graph import AtomicGraph
from potentials.models.equiformer import EquiformerV2
from potentials.models.equiformer.grid import GridMLP, S2Grid
from potentials.models.equiformer.so3 import EdgeLayout, EdgeRotation
from potentials.potential import Potential

KERNEL_METHODS = ("forward", "backward", "double_backward", "mlp_to_grid", "mlp_from_grid", "mlp_from_grid_backward",
                  "mlp_to_grid_backward", "rotate_pairs", "rotate_pairs_backward", "rotate_back_sum",
                  "rotate_back_sum_backward")


@pytest.fixture
def built():
    """The compiled kernels, which this machine must be able to build."""
    kernels = cpu.load()
    assert kernels is not None, f"the kernels must build on this machine: {cpu.unavailable_reason()}"
    return kernels


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """Count the calls of every compiled-kernel method (to show which implementation ran)."""
    calls = dict.fromkeys(KERNEL_METHODS, 0)
    for name in KERNEL_METHODS:
        original = getattr(cpu.GridKernels, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cpu.GridKernels, name, counted)
    return calls


def _edges(gen, n_nodes=9, n_edges=40):
    src = torch.randint(0, n_nodes - 2, (n_edges,), generator=gen)  # the last two nodes have no edges
    dst = torch.randint(0, n_nodes - 2, (n_edges,), generator=gen)
    return src, dst


def _operands(op: str, dtype: torch.dtype) -> tuple[tuple, tuple[int, ...], object]:
    """(arguments of ``op``, positions of the differentiable ones, how to make the arguments from them); 70
    channels: one vector tile and a part.  The rotations are made from edge vectors, as in the model: the kernels
    read, and differentiate, only the entries inside their degree blocks."""
    gen = torch.Generator().manual_seed(3)
    if op in ("s2_activation", "grid_mlp_core"):
        grid = S2Grid(2, EdgeLayout(2, 1).full_index, 3, 6) if op == "s2_activation" else S2Grid(2, torch.arange(9),
                                                                                                4, 8)
        synthesis, analysis = grid.to_grid_mat.to(dtype), grid.from_grid_mat[1:].to(dtype)
        x = torch.randn(11, synthesis.shape[1], 70, dtype=dtype, generator=gen)
        if op == "s2_activation":
            return (x, synthesis, analysis), (0,), None
        weight = torch.randn(70, 70, dtype=dtype, generator=gen) / 8
        return (x, synthesis, analysis, weight), (0, 3), None
    rotation = EdgeRotation(2, 1).to(dtype)
    degrees = torch.tensor([l for l, _ in rotation.layout.rows])
    first, length = degrees * degrees, 2 * degrees + 1
    src, dst = _edges(gen)
    vec = torch.randn(src.shape[0], 3, dtype=dtype, generator=gen)

    def make(args):
        return (args[0], rotation(args[1]), *args[2:])

    if op == "rotate_pairs":
        x = torch.randn(9, 9, 70, dtype=dtype, generator=gen)
        return (x, vec, src, dst, first, length), (0, 1), make
    msg = torch.randn(src.shape[0], rotation.layout.num_rows, 70, dtype=dtype, generator=gen)
    return (msg, vec, dst, 9, first, length), (0, 1), make


def _value_and_gradients(fn, args, wrt, make=None, create_graph=False):
    args = [a.detach().clone().requires_grad_(i in wrt) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)]
    out = fn(*(make(args) if make else args))
    gen = torch.Generator().manual_seed(4)
    probe = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    grads = torch.autograd.grad(out, [args[i] for i in wrt], probe, create_graph=create_graph)
    if not create_graph:
        return [out.detach(), *grads]
    # a derivative of the gradients (training on forces): their product with a fixed tensor, differentiated
    second = torch.autograd.grad(sum((g * g.detach().roll(1, 0)).sum() for g in grads), [args[i] for i in wrt])
    return [out.detach(), *[g.detach() for g in grads], *second]


@pytest.mark.parametrize("op", ["s2_activation", "grid_mlp_core", "rotate_pairs", "rotate_back_sum"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_each_op_matches_its_reference(built, kernel_calls, op, dtype, tol):
    """Values, gradients and (float64) derivatives of the gradients: compiled kernels against the plain reference."""
    args, wrt, make = _operands(op, dtype)
    fn = getattr(ops, op)
    second = dtype == torch.float64
    with accel.backend("torch"):
        want = _value_and_gradients(fn, args, wrt, make, second)
    assert not any(kernel_calls.values())
    with accel.backend("cpu"):
        got = _value_and_gradients(fn, args, wrt, make, second)
    assert any(kernel_calls.values())
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = b.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m, i=i: f"{op} output {i}: {m}")


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
def test_chunked_grid_silu_gradients_and_second_derivatives(monkeypatch, kernel_calls, kernels):
    """The activation (compiled kernels, or the chunked reference: grid values recomputed in the backward pass)
    against the plain composition, to the third derivative."""
    grid = S2Grid(3, EdgeLayout(3, 2).full_index, 4, 10)
    synthesis, analysis = grid.to_grid_mat, grid.from_grid_mat[1:]
    monkeypatch.setattr(ops.GridSiLU, "CHUNK_VALUES", 5 * synthesis.shape[0])  # 21 rows in 5 chunks of 4–5
    x = torch.randn(7, synthesis.shape[1], 3, dtype=torch.float64, requires_grad=True)

    def act(t):
        return ops.s2_activation(t, synthesis, analysis)

    def plain(t):
        return torch.matmul(analysis, torch.nn.functional.silu(torch.matmul(synthesis, t)))

    with accel.backend(kernels):
        torch.testing.assert_close(act(x), plain(x))
        grad = torch.randn_like(plain(x))
        torch.testing.assert_close(torch.autograd.grad(act(x), x, grad)[0], torch.autograd.grad(plain(x), x, grad)[0])
        assert torch.autograd.gradcheck(act, (x,))
        assert torch.autograd.gradgradcheck(act, (x,))
        # the derivatives of the gradient as a function of x and of the output gradient
        grad.requires_grad_(True)
        (first,) = torch.autograd.grad(act(x), x, grad, create_graph=True)
        (first_plain,) = torch.autograd.grad(plain(x), x, grad, create_graph=True)
        torch.testing.assert_close(first, first_plain)
        probe = torch.randn_like(first)
        got = torch.autograd.grad((first * probe).sum(), (x, grad), create_graph=True)
        want = torch.autograd.grad((first_plain * probe).sum(), (x, grad), create_graph=True)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
        # a third derivative (plain formulas inside the gradient's backward pass)
        third = torch.autograd.grad(got[0].square().sum(), x)[0]
        torch.testing.assert_close(third, torch.autograd.grad(want[0].square().sum(), x)[0])
    used = {"forward", "backward", "double_backward"} if kernels == "cpu" else set()
    assert {name for name, n in kernel_calls.items() if n} == used


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
def test_chunked_grid_mlp_gradients_and_second_derivatives(monkeypatch, kernel_calls, kernels):
    """The grid MLP's chunked core (grid values recomputed in the backward pass; its point-wise steps compiled, or
    the reference) against the plain composition."""
    grid = S2Grid(2, torch.arange(9), 3, 6)
    synthesis, analysis = grid.to_grid_mat, grid.from_grid_mat[1:]
    monkeypatch.setattr(ops.GridSiLU, "CHUNK_VALUES", 2 * synthesis.shape[0] * 4)  # 5 nodes in 3 chunks of 1–2
    monkeypatch.setattr(cpu._GridMLPCore, "KERNEL_CHUNK_VALUES", 2 * synthesis.shape[0] * 4)
    h = torch.randn(5, 9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def core(t, w):
        return ops.grid_mlp_core(t, synthesis, analysis, w)

    def plain(t, w):
        values = torch.nn.functional.silu(torch.nn.functional.silu(torch.matmul(synthesis, t)) @ w.T)
        return torch.matmul(analysis, values)

    with accel.backend(kernels):
        expected = plain(h, weight)
        torch.testing.assert_close(core(h, weight), expected)
        grad = torch.randn_like(expected)
        want = torch.autograd.grad(expected, (h, weight), grad)
        got = torch.autograd.grad(core(h, weight), (h, weight), grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
        assert torch.autograd.gradcheck(core, (h, weight))
        assert torch.autograd.gradgradcheck(core, (h, weight))
    used = {"mlp_to_grid", "mlp_from_grid", "mlp_from_grid_backward", "mlp_to_grid_backward"}
    assert {name for name, n in kernel_calls.items() if n} == (used if kernels == "cpu" else set())


def test_auto_runs_the_kernels_on_cpu_tensors_and_torch_never(built, kernel_calls):
    args, _, _ = _operands("s2_activation", torch.float64)
    want = ops.s2_activation.reference(*args)
    for choice, compiled in [("auto", True), ("torch", False), ("cpu", True)]:
        for name in kernel_calls:
            kernel_calls[name] = 0
        with accel.backend(choice):
            torch.testing.assert_close(ops.s2_activation(*args), want, rtol=1e-12, atol=1e-12)
            assert accel.current() == (choice, f"kernels={choice!r}")
        assert kernel_calls["forward"] == int(compiled), choice
    assert accel.current() == ("auto", "default")  # outside any block


def test_auto_uses_the_reference_where_the_kernels_do_not_apply_and_cpu_says_why(built):
    """Other devices (here the meta device, as a GPU would be) and other dtypes: the reference under "auto", a clear
    error under "cpu"."""
    on_meta = torch.zeros(2, 3, device="meta")
    half = torch.zeros(2, 3, dtype=torch.float16)
    mixed = (torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    with accel.backend("auto"):
        assert backends.implementation("s2_activation", on_meta) is None
        assert backends.implementation("s2_activation", half) is None
        assert backends.implementation("s2_activation", *mixed) is None
        assert backends.implementation("s2_activation", torch.zeros(2)) is not None
    with accel.backend("cpu"), pytest.raises(accel.KernelsUnavailable, match="kernels='cpu'.*float32 on meta"):
        backends.implementation("s2_activation", on_meta)
    with accel.backend("cpu"), pytest.raises(accel.KernelsUnavailable, match="torch.float16 on cpu"):
        backends.implementation("rotate_pairs", half)
    with pytest.raises(ValueError, match="kernels must be one of 'auto', 'torch', 'cpu', got 'gpu'"):
        with accel.backend("gpu"):
            pass


def _no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("POTENTIALS_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_state", {"lib": None, "error": None, "tried": False})
    monkeypatch.setattr(backends, "_announced", set())


def test_without_a_compiler_auto_warns_once_and_cpu_raises(monkeypatch, tmp_path, caplog):
    _no_compiler(monkeypatch, tmp_path)
    args, _, _ = _operands("s2_activation", torch.float64)
    want = ops.s2_activation.reference(*args)
    with caplog.at_level(logging.WARNING, logger="potentials.accel.backends"):
        with accel.backend("auto"):
            torch.testing.assert_close(ops.s2_activation(*args), want, rtol=0, atol=0)
            torch.testing.assert_close(ops.s2_activation(*args), want, rtol=0, atol=0)
    assert caplog.text.count("using tensor operations instead") == 1
    assert "no C++ compiler found" in caplog.text
    with accel.backend("cpu"), pytest.raises(accel.KernelsUnavailable, match=r"no C\+\+ compiler found"):
        ops.s2_activation(*args)


def test_the_environment_overrides_the_choice_and_is_named(monkeypatch, tmp_path, kernel_calls, caplog, built):
    args, _, make = _operands("rotate_pairs", torch.float64)
    args = make(args)
    monkeypatch.setattr(backends, "_announced", set())
    monkeypatch.setenv("POTENTIALS_KERNELS", "torch")
    with caplog.at_level(logging.WARNING, logger="potentials.accel.backends"), accel.backend("cpu"):
        assert accel.current() == ("torch", "POTENTIALS_KERNELS")
        ops.rotate_pairs(*args)
    assert not any(kernel_calls.values())
    assert "POTENTIALS_KERNELS=torch overrides kernels='cpu'" in caplog.text
    monkeypatch.setenv("POTENTIALS_KERNELS", "off")  # the variable's older spelling
    assert accel.current() == ("torch", "POTENTIALS_KERNELS")
    monkeypatch.setenv("POTENTIALS_KERNELS", "cpu")
    with accel.backend("torch"):
        ops.rotate_pairs(*args)
    assert kernel_calls["rotate_pairs"] == 1
    _no_compiler(monkeypatch, tmp_path)
    named = r"kernels='cpu' \(from POTENTIALS_KERNELS\)"
    with accel.backend("auto"), pytest.raises(accel.KernelsUnavailable, match=named):
        ops.rotate_pairs(*args)
    monkeypatch.setenv("POTENTIALS_KERNELS", "fast")
    with pytest.raises(ValueError, match="POTENTIALS_KERNELS must be one of auto, torch, cpu"):
        ops.rotate_pairs(*args)


def _cell(repeat=(2, 1, 1), seed=1):
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True).repeat(repeat)
    atoms.numbers[[1, 3]] = 13
    atoms.rattle(0.1, seed=seed)
    return Batch.from_data_list([AtomicGraph.from_atoms(atoms, 4.0, dtype=torch.float64)])


def _equiformer(kernels: str, mmax: int = 1) -> Potential:
    torch.manual_seed(0)
    model = EquiformerV2(cutoff=4.0, avg_num_neighbors=20.0, num_layers=2, lmax=2, mmax=mmax, channels=16,
                         attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8, attn_value_channels=8,
                         ffn_hidden_channels=16, edge_channels=16, num_basis=16)
    return Potential(model, 4.0, scale=1.0, kernels=kernels).double().eval()


def test_model_gives_the_same_energy_forces_and_stress_on_either_backend(built, kernel_calls):
    """EquiformerV2 (rotations, S² activation and grid MLP) in inference, float64: "torch" against "cpu"."""
    graph = _cell()
    want = _equiformer("torch")(graph)
    assert not any(kernel_calls.values())
    got = _equiformer("cpu")(graph)
    assert all(kernel_calls[name] for name in ("forward", "backward", "mlp_to_grid", "mlp_to_grid_backward",
                                               "rotate_pairs", "rotate_pairs_backward", "rotate_back_sum",
                                               "rotate_back_sum_backward"))
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)


def test_inference_skips_the_grid_mlp_weight_gradient_training_keeps_it(monkeypatch, built):
    """Forces and stress without a kept graph take the grid MLP's weight as a constant (no weight gradient is
    computed) on either backend; the compiled one keeps its pre-activations for the backward pass then (within a
    size limit); the same call with the graph kept (training on forces) still trains that weight."""
    graph = _cell(repeat=(1, 1, 1), seed=0)
    seen = {}
    for kernels, core in [("cpu", cpu._GridMLPCore), ("torch", ops.GridMLPCore)]:
        potential = _equiformer(kernels, mmax=2)
        weights = [m.mlp[2].weight for m in potential.modules() if isinstance(m, GridMLP)]
        assert weights and all(w.requires_grad for w in weights)
        calls, kept = [], []
        original = core.backward

        def spy(ctx, grad, original=original, calls=calls, kept=kept):
            calls.append(ctx.needs_input_grad[3])
            kept.append(getattr(ctx, "kept", None) is not None)
            out = original(ctx, grad)
            assert getattr(ctx, "kept", None) is None  # released by the backward pass, not held with the graph
            return out

        monkeypatch.setattr(core, "backward", staticmethod(spy))
        fast = potential(graph)
        potential.model.direct_forces = True  # Potential then keeps parameters differentiable (same outputs here)
        full = potential(graph)
        potential.model.direct_forces = False
        assert calls == [False] * len(weights) + [True] * len(weights)
        assert kept == [kernels == "cpu"] * len(weights) + [False] * len(weights)
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(fast[key], full[key], rtol=1e-13, atol=1e-13)
        if kernels == "cpu":
            monkeypatch.setattr(core, "KEEP_VALUES", 0)  # too large to keep: recomputed
            recomputed = potential(graph)
            assert kept[-len(weights):] == [False] * len(weights)
            for key in ("energy", "forces", "stress"):
                torch.testing.assert_close(fast[key], recomputed[key], rtol=1e-13, atol=1e-13)
        calls.clear()
        out = potential(graph, create_graph=True)
        (out["forces"] ** 2).sum().backward()
        assert len(calls) >= len(weights) and all(calls)  # forces, then the loss's way back through the outputs
        assert weights[0].grad.abs().sum() > 0  # (the last block's l > 0 outputs reach no energy)
        seen[kernels] = (fast, weights[0].grad)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(seen["cpu"][0][key], seen["torch"][0][key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen["cpu"][1], seen["torch"][1], rtol=1e-10, atol=1e-12)


def test_training_config_and_tools_pass_the_choice_on(tmp_path):
    """``kernels:`` of the training config reaches the Potential training builds; ``--kernels`` and the
    calculator's ``kernels`` replace a model file's choice."""
    from potentials.calculator import PotentialCalculator
    from potentials.cli.main import build_parser
    from potentials.export import save
    from potentials.models.egnn import EGNN
    from potentials.training.run import build
    from tests.train_config import train_config

    cfg = train_config(tmp_path / "run", tmp_path / "data", "kernels=torch", "data.source.n_structures=12",
                       "model.channels=8", "model.num_layers=1")
    assert build(cfg)[1].potential.kernels == "torch"
    assert train_config(tmp_path / "run", tmp_path / "data").kernels == "auto"

    config = {"_target_": "potentials.models.egnn.EGNN", "cutoff": 3.0, "channels": 4, "num_layers": 1}
    path = save(Potential(EGNN(cutoff=3.0, channels=4, num_layers=1), 3.0), tmp_path / "model.pt", config)
    assert PotentialCalculator.from_file(path).potential.kernels == "auto"
    assert PotentialCalculator.from_file(path, kernels="torch").potential.kernels == "torch"
    with pytest.raises(ValueError, match="kernels must be one of"):
        PotentialCalculator.from_file(path, kernels="fast")
    args = build_parser().parse_args(["relax", str(path), "in.cif", "--kernels", "cpu"])
    assert args.kernels == "cpu"
