"""The roofline accounting (benchmarks/roofline.py) against hand counts and against PyTorch's own flop counter."""

from __future__ import annotations

import pytest
import torch

from benchmarks import roofline
from potentials import accel
from potentials.accel import cpu, ops


def test_linear_and_index_add_forward_backward_match_hand_count():
    """y = x Wᵀ + b, out = zeros(M).index_add_(0, idx, y), loss = Σ out, backward to x, W and b.

    By hand: addmm 2·N·I·O forward; mm 2·N·O·I for ∂x and 2·O·N·I for ∂W backward; index_add N·O adds forward; its
    backward an index_select (a gather: bytes, no flops) of the output gradient."""
    n, i, o, m = 37, 11, 13, 5
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(i, o)
    x = torch.randn(n, i, generator=gen, requires_grad=True)
    idx = torch.randint(0, m, (n,), generator=gen)

    def step():
        y = lin(x)
        y.new_zeros(m, o).index_add_(0, idx, y).sum().backward()

    c = roofline.count(step)
    assert c.dense == 3 * 2 * n * i * o
    assert c.index == n * o
    assert c.kernels_mm == c.kernels_pointwise == 0
    assert c.counted == 6 * n * i * o + n * o
    # index_add: reads y, reads and writes the target rows, reads idx; index_select: reads and writes N·O, reads idx
    assert c.index_bytes == (3 * n * o * 4 + n * 8) + (2 * n * o * 4 + n * 8)
    assert c.ops["addmm"] == 2 * n * i * o and c.ops["mm"] == 4 * n * i * o


def test_scatter_add_and_accumulating_index_put_count_their_adds():
    src = torch.randn(20, 3)
    idx = torch.arange(20) % 4
    c = roofline.count(lambda: (torch.zeros(4, 3).scatter_add_(0, idx[:, None].expand(20, 3), src),
                                torch.zeros(4, 3).index_put_((idx,), src, accumulate=True),
                                torch.zeros(4, 3).index_put_((idx,), src)))  # a plain write: no arithmetic
    assert c.index == 2 * 60


def _grid_operands(rows=6, channels=10):
    gen = torch.Generator().manual_seed(1)
    k, g, ko = 9, 15, 8
    return (torch.randn(rows, k, channels, generator=gen), torch.randn(g, k, generator=gen),
            torch.randn(ko, g, generator=gen), torch.randn(rows, ko, channels, generator=gen),
            torch.randn(rows, k, channels, generator=gen))


def _s2_step(x, synthesis, analysis, grad_out, u):
    """Forward, gradient with a graph (as for forces), then the gradient's derivative (as a force loss does)."""
    x = x.clone().requires_grad_(True)
    grad_out = grad_out.clone().requires_grad_(True)
    out = ops.s2_activation(x, synthesis, analysis)
    (first,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
    torch.autograd.grad(first, (x, grad_out), u)


def _rotation_step(x, rot, src, dst, msg, first, length):
    x, rot, msg = (t.clone().requires_grad_(True) for t in (x, rot, msg))
    pairs = ops.rotate_pairs(x, rot, src, dst, first, length)
    back = ops.rotate_back_sum(msg, rot, dst, x.shape[0], first, length)
    (pairs.square().sum() + back.square().sum()).backward()


def _count(choice, step, *args):
    with accel.backend(choice):
        return roofline.count(lambda: step(*args))


def test_compiled_kernel_counts_equal_the_reference_matrix_products():
    """The analytic counts of the compiled kernels (invisible to PyTorch) against FlopCounterMode on the reference
    operations: their matrix-product parts must agree exactly, forward, backward and double backward."""
    assert cpu.load() is not None, f"the kernels must build on this machine: {cpu.unavailable_reason()}"
    operands = _grid_operands()
    ref, got = _count("torch", _s2_step, *operands), _count("cpu", _s2_step, *operands)
    assert ref.dense > 0 and ref.kernels_mm == 0
    assert got.dense == 0 and got.kernels_mm == ref.dense
    b, k, c = operands[0].shape
    g, ko = operands[1].shape[0], operands[2].shape[0]
    # by hand, per row: forward (2GK + 2·KO·G), gradient (4GK + 2·KO·G), its derivative (6GK + 4·KO·G)
    assert got.kernels_mm == b * c * (12 * g * k + 8 * ko * g)
    assert got.ops["accel::grid_silu_forward"] > 0 and got.ops["accel::grid_silu_double_backward"] > 0

    # rotations with full rows (every entry read), so that the reference's dense bmm does the same products
    gen = torch.Generator().manual_seed(2)
    n, e, r, kk, ch = 7, 30, 5, 5, 6
    x, rot, msg = torch.randn(n, kk, ch, generator=gen), torch.randn(e, r, kk, generator=gen), \
        torch.randn(e, r, ch, generator=gen)
    src, dst = torch.randint(0, n, (e,), generator=gen), torch.randint(0, n, (e,), generator=gen)
    first, length = torch.zeros(r, dtype=torch.long), torch.full((r,), kk, dtype=torch.long)
    args = (x, rot, src, dst, msg, first, length)
    ref, got = _count("torch", _rotation_step, *args), _count("cpu", _rotation_step, *args)
    assert got.dense == 0 and got.kernels_mm == ref.dense == (4 + 8 + 2 + 4) * e * r * kk * ch
    # a block-diagonal rotation reads only its blocks: fewer products than the dense bmm
    blocks = _count("cpu", _rotation_step, x, rot, src, dst, msg, first, torch.full((r,), 2, dtype=torch.long))
    assert blocks.kernels_mm == pytest.approx(got.kernels_mm * 2 / kk)


def test_unknown_kernel_is_named():
    with pytest.raises(KeyError, match="new_kernel"):
        roofline.kernel_cost("new_kernel", (1, 2, 3, 4), (torch.zeros(1),))


def test_roof_is_the_lower_of_bandwidth_and_peak():
    assert roofline.roof(0.5, 100.0, 20.0) == 10.0
    assert roofline.roof(50.0, 100.0, 20.0) == 100.0


def _roofline_run():
    roofs = {"gemm": [{"n": 2048, "gflops": 80.0}], "gemm_gflops": 80.0, "threads": 2, "load_avg": [1.0, 1.0, 1.0],
             "bandwidth": {"copy_GBs": 8.0, "add_GBs": 10.0, "GBs": 10.0}}
    counts = {"dense": 3e9, "kernels_mm": 0, "kernels_pointwise": 0, "index": 0, "pointwise": 1e9, "bytes": 2e9,
              "counted": 3e9, "total": 4e9, "top_flops": {"mm": 3e9}}
    profile = {"total_ms": 200.0, "ops": [{"name": "aten::mm", "self_ms": 50.0, "share": 0.25, "calls": 4}],
               "classes": {"gemm": 50.0, "other": 150.0}}
    entry = {"structure": "cu500", "mode": "infer", "n_atoms": 500, "n_edges": 21000, "min_ms": 200.0,
             "median_ms": 250.0, "counts": counts, "profile": profile, "load_avg_before_after": [[1.5, 1, 1]] * 2}
    return {"roofs": [roofs, {"error": "killed"}],
            "models": [{"label": "egnn-64", "framework": "ours", "result": {"results": [entry]}},
                       {"label": "eqv2-64-l2", "framework": "ours", "error": "boom"}]}


def test_roofline_report_derives_rates_and_roofs(tmp_path):
    """4 GFLOP in 0.2 s = 20 GFLOP/s, 25 % of an 80 GFLOP/s peak; 2 flop/byte at 10 GB/s: a 20 GFLOP/s roof (memory
    bound, 100 % of it); the GEMM class ran 3 GFLOP in 50 ms = 60 GFLOP/s."""
    from benchmarks import roofline_report
    from benchmarks.__main__ import write

    data = _roofline_run()
    ((label, _, d),) = list(roofline_report.rows(data))
    assert label == "egnn-64" and d["achieved"] == pytest.approx(20.0) and d["peak_share"] == pytest.approx(0.25)
    assert d["intensity"] == pytest.approx(2.0) and d["roof"] == pytest.approx(20.0)
    assert "| 60 |" in roofline_report.time_table(data)
    machine = {"host": "h", "cpu": "c", "cores": 2, "memory_GB": 1, "platform": "p", "load_avg_1_5_15": [0, 0, 0]}
    meta = {"start": "2026-01-02T03:04:05", "command": "python -m benchmarks run --only roofline",
            "machine_start": machine, "settings": {"threads": 2, "omp_wait_policy": "PASSIVE"}}
    (md,) = write({"meta": meta, "records": {"roofline": data}}, tmp_path)
    text = md.read_text()
    assert md.name == "roofline.md" and "2026-01-02 03:04" in text and "![roofline](roofline.png)" in text
    assert "| egnn-64 | cu500 | infer (E+F+S) | 500 | 21000 | 200 (250) | 3 | 0 | 0 | 1 | 4 | 20 | 25 |" in text
    assert "Not measured: eqv2-64-l2: boom" in text and "| end | killed |" in text
    assert (tmp_path / "roofline.png").stat().st_size > 1000


def test_roofline_models_default_and_filter():
    from benchmarks import suite

    assert list(suite.roofline_models(suite.Settings.make(False))) == list(suite.ROOFLINE_MODELS)
    chosen = suite.roofline_models(suite.Settings.make(False, models=("mace-64", "facet-128")))
    assert list(chosen) == ["facet-128"]
