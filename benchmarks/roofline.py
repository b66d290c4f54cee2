"""Roofline accounting of one model step: floating-point work, bytes moved, the machine's measured roofs.

What is counted, per call of a step function (:func:`count`):

* ``dense``: matrix products (mm, addmm, bmm, baddbmm, convolutions, attention) as
  :class:`torch.utils.flop_counter.FlopCounterMode` counts them: 2 per multiply-add, the backward passes
  included (forces by autograd, and the double backward of a training step on forces);
* ``kernels``: the compiled CPU kernels of :mod:`potentials.accel.cpu`, which PyTorch never sees (ctypes calls):
  analytic counts per call from the kernel's sizes (:func:`kernel_cost`), split into their matrix-product part
  (2 per multiply-add, the same convention as ``dense``) and their point-wise part;
* ``index``: scatter-adds (index_add, scatter_add, scatter_reduce, index_put with accumulate): 1 per added element;
  gathers (index_select, gather, index, embedding) move bytes but do no arithmetic;
* ``pointwise``: every other operation tagged point-wise or reduction, 1 per output (point-wise) or input
  (reduction) element, whatever the function (exp counts as 1, like an add): an estimate, reported apart.

Bytes moved (``bytes``): per operation, the bytes of its tensor inputs and outputs (views move none; a gather reads
the gathered rows, a scatter-add reads and writes the target rows it touches); the compiled kernels' operands once,
with the gathered node rows of the rotations once per edge.  Summed over operations this assumes no reuse in cache
between operations: an upper estimate of DRAM traffic for the large tensors, an overestimate for small ones.

Roofs (:func:`gemm_peak`, :func:`bandwidth`): the best of several large float32 matrix products at the current
thread count, and the best of several large copies and adds (bytes read + written per second).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

#: scatter-adds: the operand whose elements are each added once (argument position), the target (position)
SCATTER_ADDS = {
    aten.index_add.default: 3, aten.index_add_.default: 3, aten.index_add.out: 3,
    aten.scatter_add.default: 3, aten.scatter_add_.default: 3,
    aten.scatter_reduce.two: 3, aten.scatter_reduce_.two: 3,
}
#: index_put with accumulate=True adds its values (position 2) into the target
INDEX_PUTS = {aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
#: gathers: no arithmetic; the output's bytes are read from the source and written
GATHERS = {aten.index_select.default, aten.gather.default, aten.index.Tensor, aten.embedding.default,
           aten.take_along_dim.default}


@dataclass
class Counts:
    """Floating-point operations and bytes of one counted call; ``ops``: per-operation flops (all categories)."""

    dense: int = 0
    kernels_mm: int = 0
    kernels_pointwise: int = 0
    index: int = 0
    pointwise: int = 0
    bytes: int = 0
    index_bytes: int = 0
    kernel_bytes: int = 0
    ops: Counter = field(default_factory=Counter)
    op_bytes: Counter = field(default_factory=Counter)

    @property
    def counted(self) -> int:
        """Matrix products (PyTorch's and the kernels'), kernel point-wise work and scatter-adds."""
        return self.dense + self.kernels_mm + self.kernels_pointwise + self.index

    @property
    def total(self) -> int:
        """``counted`` plus the estimate of PyTorch's point-wise work."""
        return self.counted + self.pointwise

    def as_dict(self, top: int = 12) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("ops", "op_bytes")}
        out.update(counted=self.counted, total=self.total,
                   top_flops=dict(self.ops.most_common(top)), top_bytes=dict(self.op_bytes.most_common(top)))
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _OpCounter(TorchDispatchMode):
    """Scatter/gather flops and bytes, point-wise flops and every operation's bytes (see the module docstring)."""

    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func in (aten.detach.default, aten.lift_fresh.default):
            return out
        c, name = self.counts, func.overloadpacket.__name__
        flops = 0
        if func in SCATTER_ADDS or (func in INDEX_PUTS and (kwargs.get("accumulate") or
                                                            (len(args) > 3 and args[3] is True))):
            pos = SCATTER_ADDS.get(func, 2)
            src = args[pos] if len(args) > pos else kwargs.get("source", kwargs.get("src", kwargs.get("values")))
            idx = [t for t in _tensors(args[1:pos]) if not t.is_floating_point()]
            flops = src.numel()
            moved = 3 * _nbytes(src) + sum(_nbytes(t) for t in idx)  # read source, read + write the target rows
            c.index += flops
            c.index_bytes += moved
        elif func in GATHERS:
            idx = [t for t in _tensors((args, kwargs)) if not t.is_floating_point()]
            moved = 2 * sum(_nbytes(t) for t in _tensors(out)) + sum(_nbytes(t) for t in idx)
            c.index_bytes += moved
        else:
            moved = sum(_nbytes(t) for t in _tensors((args, kwargs)) + _tensors(out))
            if torch.Tag.pointwise in func.tags:
                flops = sum(t.numel() for t in _tensors(out))
            elif torch.Tag.reduction in func.tags:
                flops = sum(t.numel() for t in _tensors(args[:1]))
            c.pointwise += flops
        c.bytes += moved
        c.ops[name] += flops
        c.op_bytes[name] += moved
        return out


# ------------------------------------------------------------------------------------------------------------------
# The compiled kernels: analytic counts per call (potentials/accel/grid_kernels.cpp)


def _rotation_nnz(length: torch.Tensor) -> int:
    """Entries read per edge of a block-diagonal rotation [R, K] (row r: ``length[r]`` columns)."""
    return int(length.sum())


def kernel_cost(name: str, sizes: tuple[int, ...], args: tuple) -> tuple[int, int, int]:
    """(matrix-product flops, point-wise flops, bytes) of one call of compiled kernel ``name``.

    ``sizes`` and ``args`` as :meth:`potentials.accel.cpu.GridKernels._call` passes them.  The grid kernels work
    on B·C rows of K coefficients, G grid points, KO output coefficients; the rotations on E edges with R rows of
    ``length.sum()`` non-zero entries each.
    """
    operand_bytes = sum(_nbytes(a) for a in args if isinstance(a, torch.Tensor))
    if name.startswith(("grid_silu", "mlp_")):
        b, k, g, ko, c = sizes
        rows = b * c
        per_row = {  # (multiply-adds ×2, point-wise), per row
            "grid_silu_forward": (2 * g * k + 2 * ko * g, g),
            "grid_silu_backward": (4 * g * k + 2 * ko * g, 2 * g),
            "mlp_to_grid": (2 * g * k, g),
            "mlp_from_grid": (2 * ko * g, g),
            "mlp_from_grid_backward": (2 * ko * g, 2 * g),
            "mlp_to_grid_backward": (4 * g * k, 2 * g),
        }
        if name == "grid_silu_double_backward":
            need_x, need_grad = args[5] is not None, args[6] is not None
            mm = 4 * g * k + (2 * ko * g + 2 * g * k if need_x else 0) + (2 * ko * g if need_grad else 0)
            pw = 2 * g + (g if need_x else 0)
        else:
            mm, pw = per_row[name]
        return rows * mm, rows * pw, operand_bytes
    elt = args[0].element_size()
    if name == "rotate_pairs":  # x, rot, src, dst, first, length, out; sizes (E, R, K, C)
        e, r, k, c = sizes
        nnz = _rotation_nnz(args[5])
        gathered = 2 * e * k * c * elt  # x rows of both ends, once per edge
        return 4 * e * nnz * c, 0, operand_bytes - _nbytes(args[0]) + gathered
    if name == "rotate_pairs_backward":  # x, rot, grad, order, start, first, length, grad_x, grad_rot
        n, e, r, k, c = sizes
        nnz = _rotation_nnz(args[6])
        gathered = 2 * e * k * c * elt
        return 8 * e * nnz * c, 0, operand_bytes - _nbytes(args[0]) + gathered
    if name == "rotate_back_sum":  # msg, rot, order, start, first, length, out; sizes (N, R, K, C)
        e, c = args[0].shape[0], args[0].shape[2]
        return 2 * e * _rotation_nnz(args[5]) * c, 0, operand_bytes
    if name == "rotate_back_sum_backward":  # msg, rot, grad, dst, first, length, grad_msg, grad_rot; (E, R, K, C)
        e, r, k, c = sizes
        gathered = e * k * c * elt  # grad rows of each edge's centre
        return 4 * e * _rotation_nnz(args[5]) * c, 0, operand_bytes - _nbytes(args[2]) + gathered
    raise KeyError(f"no flop count for compiled kernel {name!r}; add it to benchmarks/roofline.py kernel_cost")


@contextlib.contextmanager
def watch_kernels(counts: Counts | None = None, ranges: bool = False) -> Iterator[None]:
    """Count the compiled kernels' work into ``counts`` and/or mark each call as a profiler range
    (``accel::<kernel>``), so that a profile shows where their time goes."""
    from potentials.accel import cpu

    original = cpu.GridKernels._call

    def _call(self, name, sizes, *args):
        if counts is not None:
            mm, pw, moved = kernel_cost(name, tuple(sizes), args)
            counts.kernels_mm += mm
            counts.kernels_pointwise += pw
            counts.kernel_bytes += moved
            counts.bytes += moved
            counts.ops[f"accel::{name}"] += mm + pw
            counts.op_bytes[f"accel::{name}"] += moved
        if ranges:
            with torch.profiler.record_function(f"accel::{name}"):
                return original(self, name, sizes, *args)
        return original(self, name, sizes, *args)

    cpu.GridKernels._call = _call
    try:
        yield
    finally:
        cpu.GridKernels._call = original


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every count goes to "Global".  The tracker's backward hooks
    fail in ``autograd.grad`` with a leaf input (positions, for forces), and the per-module split is not needed."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count(step: Callable[[], object]) -> Counts:
    """Flops and bytes of one call of ``step`` (its forward and backward passes, whatever it runs)."""
    counts = Counts()
    flop_mode = FlopCounterMode(display=False)
    flop_mode.mod_tracker = _GlobalOnly()
    with flop_mode, _OpCounter(counts), watch_kernels(counts):
        step()
    for op, n in flop_mode.get_flop_counts().get("Global", {}).items():
        counts.dense += int(n)
        counts.ops[getattr(op, "__name__", str(op))] += int(n)
    return counts


# ------------------------------------------------------------------------------------------------------------------
# Roofs and profiles


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> dict:
    """Dense GEMM roof: the best of ``repeats`` n×n products (2n³ flops each) at the current thread count."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype)
    best = _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return {"n": n, "repeats": repeats, "threads": torch.get_num_threads(), "best_s": best,
            "gflops": 2 * n ** 3 / best / 1e9}


def narrow_gemm(rows: int = 21000, inner: int = 64, cols: int = 64, repeats: int = 20,
                dtype: torch.dtype = torch.float32) -> dict:
    """The rate of the matrix products the models are made of: [rows × inner] · [inner × cols], e.g. a 64-channel
    linear layer on the 21 000 edges of Cu500; the best of ``repeats``."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, inner, generator=gen, dtype=dtype), torch.randn(inner, cols, generator=gen, dtype=dtype)
    out = torch.empty(rows, cols, dtype=dtype)
    best = _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return {"shape": [rows, inner, cols], "best_s": best, "gflops": 2 * rows * inner * cols / best / 1e9}


def bandwidth(megabytes: int = 256, repeats: int = 5) -> dict:
    """Memory roof: the best of ``repeats`` copies (read + write) and adds (2 reads + 1 write) of float32 arrays of
    ``megabytes`` each, far beyond any cache; GB/s of bytes read and written."""
    n = megabytes * (1 << 20) // 4
    a, b, out = torch.ones(n), torch.ones(n), torch.empty(n)
    copy_s = _best_seconds(lambda: out.copy_(a), repeats)
    add_s = _best_seconds(lambda: torch.add(a, b, out=out), repeats)
    size = n * 4
    copy_gbs, add_gbs = 2 * size / copy_s / 1e9, 3 * size / add_s / 1e9
    return {"megabytes": megabytes, "repeats": repeats, "copy_GBs": copy_gbs, "add_GBs": add_gbs,
            "GBs": max(copy_gbs, add_gbs)}


#: profiler event names by class, for the split of a step's time
GEMM_EVENTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
               "aten::_convolution", "aten::mkldnn_convolution"}
INDEX_EVENTS = {"aten::index_add_", "aten::index_add", "aten::index_select", "aten::scatter_add_", "aten::scatter_add",
                "aten::scatter_reduce_", "aten::scatter_reduce", "aten::gather", "aten::index", "aten::index_put_",
                "aten::_index_put_impl_", "aten::embedding", "aten::embedding_dense_backward", "aten::scatter_",
                "aten::scatter"}


def event_class(name: str) -> str:
    """``gemm``, ``kernels`` (compiled), ``index`` (gathers and scatters), ``autograd`` (the engine's own frames:
    autograd functions and their backward nodes, whose self time is Python and bookkeeping) or ``other``."""
    if name in GEMM_EVENTS:
        return "gemm"
    if name.startswith("accel::"):
        return "kernels"
    if name in INDEX_EVENTS:
        return "index"
    if name.startswith("autograd::") or "Backward" in name or not name.startswith(("aten::", "accel::")):
        return "autograd"
    return "other"


def profile_top(step: Callable[[], object], calls: int = 2, top: int = 8) -> dict:
    """The operations taking most self CPU time over ``calls`` calls of ``step`` (compiled kernels as
    ``accel::<kernel>`` ranges), per call: ``{"total_ms", "ops": [{"name", "self_ms", "share", "calls"}],
    "classes": {class: self_ms}}`` (classes of :func:`event_class`)."""
    from torch.profiler import ProfilerActivity, profile

    with watch_kernels(ranges=True), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3 / calls, "share": e.self_cpu_time_total / total,
            "calls": e.count // calls} for e in events[:top]]
    classes: Counter = Counter()
    for e in events:
        classes[event_class(e.key)] += e.self_cpu_time_total / 1e3 / calls
    return {"total_ms": total / 1e3 / calls, "ops": ops, "classes": dict(classes)}


def roof(intensity: float, peak_gflops: float, bandwidth_gbs: float) -> float:
    """Attainable GFLOP/s at ``intensity`` flops/byte: min(peak, intensity × bandwidth)."""
    return min(peak_gflops, intensity * bandwidth_gbs)
