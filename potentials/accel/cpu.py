"""The compiled CPU backend of the reference operations (:mod:`potentials.accel.ops`): ``kernels="cpu"``.

``grid_kernels.cpp`` holds the fused S² grid activation with its gradient and the gradient's derivative, the grid
MLP's point-wise steps around its channel-mixing product, and the rotations of the message passing (node pairs into
the edge frames, messages back into their centres) with their gradients.  Each works on one row's (or node's) data
at a time, in the cache, on the tensors' own layout: no grid values or gathered pairs are written to memory.  The
rotations and their gradients are bilinear, so derivatives of any order are these kernels again.

Build.  ``c++ -O3 -march=native -fopenmp -shared`` into a cache folder (``$POTENTIALS_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/potentials/kernels``, else ``~/.cache/potentials/kernels``), keyed by a hash of the source, the
compiler's version, the flags and the CPU's features, so a shared home folder never hands one machine another's
build; once per machine.  The compiler is ``$CXX`` if set, else ``c++``; a compiler that rejects
``-march=native`` or ``-fopenmp`` gets a build without them (a serial one without OpenMP).  The library links
libgomp by its soname; with PyTorch's wheels, which ship ``libgomp.so.1``, that is the runtime PyTorch has loaded
(a PyTorch built on another OpenMP runtime would bring a second thread pool).  It runs on
``torch.get_num_threads()`` threads.

The kernels compute the reference's values to round-off (their exp is their own, within 2–3 ulp).  When they cannot
be built (no compiler, no writable cache folder, compiler errors), :func:`unavailable_reason` says why and the
``kernels`` choice decides (:mod:`potentials.accel.backends`): ``"auto"`` warns once and runs the reference,
``"cpu"`` raises.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from potentials.accel import backends, ops

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("grid_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
#: what build() tries, in order
FLAG_SETS = (FLAGS, tuple(f for f in FLAGS if f != "-march=native"),
             tuple(f for f in FLAGS if f not in ("-march=native", "-fopenmp")))

_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_state: dict = {"lib": None, "error": None, "tried": False}


class GridKernels:
    """The fused activation y = A · SiLU(S · x) on rows x [B, K, C] (S [G, K], A [KO, G]), its gradient and the
    gradient's derivative, the grid MLP's point-wise steps and the edge-frame rotation of node pairs with its
    gradient; all inputs contiguous CPU tensors of one dtype (float32 or float64; indices int64)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib

    def _call(self, name: str, sizes: tuple[int, ...], *args: torch.Tensor | None) -> None:
        fn = getattr(self._lib, f"{name}_{_DTYPES[args[0].dtype]}")
        pointers = [ctypes.c_void_p(a.data_ptr() if a is not None else None) for a in args]
        fn(*pointers, *[ctypes.c_int64(n) for n in sizes], ctypes.c_int(torch.get_num_threads()))

    def forward(self, x: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
        """A · SiLU(S · x) per row: [B, K, C] → [B, KO, C]."""
        sizes = _sizes(x, synthesis, analysis)
        out = x.new_empty(x.shape[0], analysis.shape[0], x.shape[2])
        self._call("grid_silu_forward", sizes, x, synthesis, analysis, out)
        return out

    def backward(self, x: torch.Tensor, grad: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor
                 ) -> torch.Tensor:
        """Sᵀ · (SiLU'(S·x) ⊙ Aᵀ · grad) per row: the gradient with respect to x for the output gradient grad."""
        sizes = _sizes(x, synthesis, analysis, grad)
        out = torch.empty_like(x)
        self._call("grid_silu_backward", sizes, x, grad, synthesis, analysis, out)
        return out

    def double_backward(self, x: torch.Tensor, grad: torch.Tensor, u: torch.Tensor, synthesis: torch.Tensor,
                        analysis: torch.Tensor, need_x: bool = True, need_grad: bool = True
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For an incoming gradient u of :meth:`backward`'s output: (its gradient with respect to x, with respect to
        grad) = (Sᵀ · (SiLU''(y) ⊙ h ⊙ v), A · (SiLU'(y) ⊙ v)) with y = S·x, v = S·u, h = Aᵀ·grad."""
        sizes = _sizes(x, synthesis, analysis, grad, u)
        out_x = torch.empty_like(x) if need_x else None
        out_grad = torch.empty_like(grad) if need_grad else None
        if need_x or need_grad:
            self._call("grid_silu_double_backward", sizes, x, grad, u, synthesis, analysis, out_x, out_grad)
        return out_x, out_grad


    # the grid MLP's point-wise steps around its channel-mixing product (GridMLPCore); grid values [B, G, C]

    def mlp_to_grid(self, h: torch.Tensor, synthesis: torch.Tensor) -> torch.Tensor:
        """SiLU(S · h) per row: [B, K, C] → [B, G, C]."""
        (b, k, c), g = h.shape, synthesis.shape[0]
        _check(h.dtype, h=(h, (b, k, c)), synthesis=(synthesis, (g, k)))
        out = h.new_empty(b, g, c)
        self._call("mlp_to_grid", (b, k, g, 0, c), h, synthesis, out)
        return out

    def mlp_from_grid(self, p: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
        """A · SiLU(p) per row: [B, G, C] → [B, KO, C]."""
        (b, g, c), ko = p.shape, analysis.shape[0]
        _check(p.dtype, p=(p, (b, g, c)), analysis=(analysis, (ko, g)))
        out = p.new_empty(b, ko, c)
        self._call("mlp_from_grid", (b, 0, g, ko, c), p, analysis, out)
        return out

    def mlp_from_grid_backward(self, p: torch.Tensor, grad: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
        """SiLU'(p) ⊙ (Aᵀ · grad) per row: the gradient of :meth:`mlp_from_grid` with respect to p."""
        (b, g, c), ko = p.shape, analysis.shape[0]
        _check(p.dtype, p=(p, (b, g, c)), grad=(grad, (b, ko, c)), analysis=(analysis, (ko, g)))
        out = torch.empty_like(p)
        self._call("mlp_from_grid_backward", (b, 0, g, ko, c), p, grad, analysis, out)
        return out

    def mlp_to_grid_backward(self, h: torch.Tensor, grad: torch.Tensor, synthesis: torch.Tensor) -> torch.Tensor:
        """Sᵀ · (SiLU'(S · h) ⊙ grad) per row: the gradient of :meth:`mlp_to_grid` with respect to h."""
        (b, k, c), g = h.shape, synthesis.shape[0]
        _check(h.dtype, h=(h, (b, k, c)), grad=(grad, (b, g, c)), synthesis=(synthesis, (g, k)))
        out = torch.empty_like(h)
        self._call("mlp_to_grid_backward", (b, k, g, 0, c), h, grad, synthesis, out)
        return out


    # node pairs rotated into the edge frames (the message input of the eSCN convolution); rot [E, R, K] is
    # block-diagonal, row r non-zero in columns first[r] … first[r] + length[r] − 1 only

    def rotate_pairs(self, x: torch.Tensor, rot: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                     first: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """[rot[e] · x[src[e]], rot[e] · x[dst[e]]] (channels concatenated) per edge: [N, K, C] → [E, R, 2C]."""
        (n, k, c), (e, r) = x.shape, rot.shape[:2]
        _check(x.dtype, x=(x, (n, k, c)), rot=(rot, (e, r, k)))
        _check(torch.int64, src=(src, (e,)), dst=(dst, (e,)), first=(first, (r,)), length=(length, (r,)))
        _check_blocks(first, length, k)
        out = x.new_empty(e, r, 2 * c)
        self._call("rotate_pairs", (e, r, k, c), x, rot, src, dst, first, length, out)
        return out

    def rotate_pairs_backward(self, x: torch.Tensor, rot: torch.Tensor, grad: torch.Tensor, order: torch.Tensor,
                              start: torch.Tensor, first: torch.Tensor, length: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of :meth:`rotate_pairs` with respect to x and rot (zero outside rot's blocks) for the output
        gradient ``grad``; ``order`` [2, E]: the edges sorted by src and by dst, ``start`` [2, N + 1]: where each
        node's edges begin in them."""
        (n, k, c), (e, r) = x.shape, rot.shape[:2]
        _check(x.dtype, x=(x, (n, k, c)), rot=(rot, (e, r, k)), grad=(grad, (e, r, 2 * c)))
        _check(torch.int64, order=(order, (2, e)), start=(start, (2, n + 1)), first=(first, (r,)),
               length=(length, (r,)))
        _check_blocks(first, length, k)
        grad_x = torch.empty_like(x)
        grad_rot = rot.new_empty(2, e, r, k)  # the src and dst halves' parts, written by different nodes
        self._call("rotate_pairs_backward", (n, e, r, k, c), x, rot, grad, order, start, first, length, grad_x,
                   grad_rot)
        return grad_x, grad_rot[0] + grad_rot[1]

    def rotate_back_sum(self, msg: torch.Tensor, rot: torch.Tensor, order: torch.Tensor, start: torch.Tensor,
                        first: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Σ_{e: dst[e] = n} rot[e]ᵀ · msg[e] per node n: [E, R, C] → [N, K, C]; ``order`` [E] the edges sorted by
        dst, ``start`` [N + 1] where each node's edges begin in it."""
        (e, r, c), k, n = msg.shape, rot.shape[2], start.shape[0] - 1
        _check(msg.dtype, msg=(msg, (e, r, c)), rot=(rot, (e, r, k)))
        _check(torch.int64, order=(order, (e,)), start=(start, (n + 1,)), first=(first, (r,)), length=(length, (r,)))
        _check_blocks(first, length, k)
        out = msg.new_empty(n, k, c)
        self._call("rotate_back_sum", (n, r, k, c), msg, rot, order, start, first, length, out)
        return out

    def rotate_back_sum_backward(self, msg: torch.Tensor, rot: torch.Tensor, grad: torch.Tensor, dst: torch.Tensor,
                                 first: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of :meth:`rotate_back_sum` with respect to msg and rot (zero outside rot's blocks) for the
        output gradient ``grad`` [N, K, C]."""
        (e, r, c), k = msg.shape, rot.shape[2]
        _check(msg.dtype, msg=(msg, (e, r, c)), rot=(rot, (e, r, k)), grad=(grad, (grad.shape[0], k, c)))
        _check(torch.int64, dst=(dst, (e,)), first=(first, (r,)), length=(length, (r,)))
        _check_blocks(first, length, k)
        grad_msg, grad_rot = torch.empty_like(msg), torch.empty_like(rot)
        self._call("rotate_back_sum_backward", (e, r, k, c), msg, rot, grad, dst, first, length, grad_msg, grad_rot)
        return grad_msg, grad_rot


def _sizes(x, synthesis, analysis, grad=None, u=None) -> tuple[int, int, int, int, int]:
    """(B, K, G, KO, C) of the activation's operands, after checking them."""
    b, k, c = x.shape
    g, ko = synthesis.shape[0], analysis.shape[0]
    expected = {"x": (x, (b, k, c)), "synthesis": (synthesis, (g, k)), "analysis": (analysis, (ko, g))}
    if grad is not None:
        expected["grad"] = (grad, (b, ko, c))
    if u is not None:
        expected["u"] = (u, (b, k, c))
    _check(x.dtype, **expected)
    return b, k, g, ko, c


def _check_blocks(first: torch.Tensor, length: torch.Tensor, k: int) -> None:
    """Every row's block of columns first … first + length − 1 non-empty and inside the K = ``k`` columns."""
    if any(f < 0 or n < 1 or f + n > k for f, n in zip(first.tolist(), length.tolist(), strict=True)):
        raise ValueError(f"rotation kernel: row blocks (first {first.tolist()}, length {length.tolist()}) must lie "
                         f"within the {k} columns")


def _check(dtype: torch.dtype, **operands: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """Every operand a contiguous CPU tensor of ``dtype`` and its expected shape, or a ValueError naming it."""
    for name, (t, shape) in operands.items():
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"grid kernel: {name} must be a contiguous CPU {dtype} tensor of shape {shape}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})")


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels apply to these floating-point operands: all on the CPU, float32 or float64, one dtype."""
    return bool(tensors) and tensors[0].dtype in _DTYPES and all(
        t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors)


def load() -> GridKernels | None:
    """The compiled kernels, built (or found built) and loaded on the first call; None if that failed
    (:func:`unavailable_reason` says why)."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            try:
                lib = _load(build())
            except (OSError, AttributeError):  # a cached library that no longer loads (or lacks a function)
                lib = _load(build(rebuild=True))
            _state["lib"] = GridKernels(lib)
        except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
            _state["error"] = str(err)
    return _state["lib"]


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used (None if they were built, or were not tried yet)."""
    return _state["error"]


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get("POTENTIALS_KERNEL_CACHE"):
        return Path(os.environ["POTENTIALS_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "potentials" / "kernels"


def build(rebuild: bool = False) -> Path:
    """Compile ``grid_kernels.cpp`` (or find it compiled) and return the library's path.

    Flags are tried in turn: the full set; without ``-march=native``; serial, without ``-fopenmp`` as well (for
    compilers without OpenMP, e.g. Apple's clang: correct, one thread).  ``rebuild`` replaces a cached library.

    Raises:
        RuntimeError: no compiler, the cache folder is not writable, or every compilation failed (with the
            compiler's last message).
    """
    compiler = shlex.split(os.environ.get("CXX") or "c++")
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C++ compiler found ({' '.join(compiler)!r}; set CXX to choose one)")
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeError(f"cannot create the kernel cache {folder} ({err}); set POTENTIALS_KERNEL_CACHE to a "
                           "writable folder") from err
    message = ""
    for flags in FLAG_SETS:
        key = hashlib.sha256()
        for part in (SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(), _cpu_features().encode()):
            key.update(part)
        target = folder / f"grid_kernels-{key.hexdigest()[:16]}.so"
        if target.exists() and not rebuild:
            return target
        # build under a temporary name and move into place: concurrent builds (test workers) never see a partial
        # file
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            partial = Path(tmp) / target.name
            result = subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True,
                                    text=True, timeout=300)
            if result.returncode == 0:
                os.replace(partial, target)
                log.info("built %s (%s)", target, " ".join(flags))
                return target
        message = (f"{' '.join(compiler)} failed on {SOURCE.name} (exit {result.returncode}, flags "
                   f"{' '.join(flags)}):\n{result.stderr.strip()[-2000:]}")
    raise RuntimeError(message)


def _load(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions (OSError or AttributeError if it is not loadable or
    incomplete)."""
    lib = ctypes.CDLL(str(path))
    for dtype in _DTYPES.values():
        for name in ("grid_silu_forward", "grid_silu_backward", "grid_silu_double_backward", "mlp_to_grid",
                     "mlp_from_grid", "mlp_from_grid_backward", "mlp_to_grid_backward", "rotate_pairs",
                     "rotate_pairs_backward", "rotate_back_sum", "rotate_back_sum_backward"):
            getattr(lib, f"{name}_{dtype}").restype = None
    return lib


def _cpu_features() -> str:
    """The CPU's model and feature flags (the build uses -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() + platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("flags", "model name", "Features"))}))


# ---------------------------------------------------------------------------------------------------------------
# The operations of potentials.accel.ops on the kernels.  Each autograd function runs the kernels in its backward
# pass too (whatever the choice is by then); a backward pass whose graph is kept (a derivative of higher order than
# the kernels provide) uses the reference's differentiable formulas.


class _GridSiLU(torch.autograd.Function):
    """:func:`potentials.accel.ops.s2_activation` on the fused kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
        x, synthesis, analysis = x.contiguous(), synthesis.contiguous(), analysis.contiguous()
        ctx.save_for_backward(x, synthesis, analysis)
        return _kernels().forward(x, synthesis, analysis)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, synthesis, analysis = ctx.saved_tensors
        return _GridSiLUGrad.apply(x, grad, synthesis, analysis), None, None


class _GridSiLUGrad(torch.autograd.Function):
    """The gradient of :class:`_GridSiLU` as a function of x and the output gradient (see
    :class:`potentials.accel.ops.GridSiLUGrad`), and its own gradient, on the kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grad: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor
                ) -> torch.Tensor:
        grad = grad.contiguous()
        ctx.save_for_backward(x, grad, synthesis, analysis)
        return _kernels().backward(x, grad, synthesis, analysis)

    @staticmethod
    def backward(ctx, u: torch.Tensor):
        x, grad, synthesis, analysis = ctx.saved_tensors
        need_x, need_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # a graph of this backward pass is being built: differentiable operations
            grad_x, grad_g = ops.grid_silu_second_derivatives(x, grad, u, synthesis, analysis, need_x, need_grad)
        else:
            grad_x, grad_g = _kernels().double_backward(x, grad, u.contiguous(), synthesis, analysis, need_x,
                                                       need_grad)
        return grad_x, grad_g, None, None


class _GridMLPCore(torch.autograd.Function):
    """:func:`potentials.accel.ops.grid_mlp_core` with its point-wise steps on the kernels, node-major ([B, G, C]),
    in chunks of :attr:`KERNEL_CHUNK_VALUES` grid values; the channel-mixing product stays with the BLAS."""

    #: grid values per chunk (16 MB in float32)
    KERNEL_CHUNK_VALUES = 1 << 22
    #: without a weight gradient (inference), the forward pass keeps the pre-activations for the backward pass (a
    #: matrix product and a kernel less per layer) up to this many grid values (128 MB in float32, ~1800 atoms at
    #: lmax 2 and 64 channels); above, the backward pass recomputes them
    KEEP_VALUES = 1 << 25

    @staticmethod
    def forward(ctx, h: torch.Tensor, synthesis: torch.Tensor, analysis: torch.Tensor, weight: torch.Tensor
                ) -> torch.Tensor:
        n, _, c = h.shape
        kernels = _kernels()
        h, synthesis, analysis = h.contiguous(), synthesis.contiguous(), analysis.contiguous()
        ctx.save_for_backward(h, synthesis, analysis, weight)
        out = h.new_empty(n, analysis.shape[0], c)
        keep = not ctx.needs_input_grad[3] and n * synthesis.shape[0] * c <= _GridMLPCore.KEEP_VALUES
        ctx.kept = [] if keep else None
        for chunk in ops.chunks(n, synthesis.shape[0] * c, _GridMLPCore.KERNEL_CHUNK_VALUES):
            a = kernels.mlp_to_grid(h[chunk], synthesis)
            pre = torch.mm(a.view(-1, c), weight.T).view(a.shape)
            out[chunk] = kernels.mlp_from_grid(pre, analysis)
            if keep:
                ctx.kept.append(pre)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, synthesis, analysis, weight = ctx.saved_tensors
        n, _, c = h.shape
        kept, ctx.kept = ctx.kept, None  # released with this pass, not with the graph
        if torch.is_grad_enabled():  # a graph of this backward pass is being built: differentiable operations only
            return ops.grid_mlp_core_backward(h, grad, synthesis, analysis, weight)
        kernels = _kernels()
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[3] else None
        grad, grad_h = grad.contiguous(), torch.empty_like(h)
        for i, chunk in enumerate(ops.chunks(n, synthesis.shape[0] * c, _GridMLPCore.KERNEL_CHUNK_VALUES)):
            if kept is not None:  # kept only without a weight gradient, which alone needs a
                pre = kept[i]
            else:
                a = kernels.mlp_to_grid(h[chunk], synthesis)
                pre = torch.mm(a.view(-1, c), weight.T).view(a.shape)
            grad_pre = kernels.mlp_from_grid_backward(pre, grad[chunk], analysis)
            if grad_weight is not None:  # not in inference (potentials.nn.grad_scope)
                grad_weight.addmm_(grad_pre.view(-1, c).T, a.view(-1, c))
            grad_a = torch.mm(grad_pre.view(-1, c), weight).view(pre.shape)
            grad_h[chunk] = kernels.mlp_to_grid_backward(h[chunk], grad_a, synthesis)
        return grad_h, None, None, grad_weight


@dataclass(frozen=True)
class _RotationOp:
    """One of the two rotation kernels, both bilinear in their two arguments (a, w), w being block-diagonal like the
    rotation (read in the columns ``first`` … ``first + length`` of each row only):

    * ``"pairs"``: a = node features [N, K, C] → bmm(w, [a[src], a[dst]]) [E, R, 2C], without the gathered copy;
    * ``"back"``: a = edge-frame messages [E, R, C] → Σ over each centre's edges of bmm(wᵀ, a), [N, K, C].

    ``grad(g, a, w)`` gives the gradients (by a, by w) of ⟨g, value(a, w)⟩, by a kernel of its own (node by node where
    it sums over edges, so no two threads add into one row).  Holds index tensors only (the autograd graph keeps it).
    """

    kind: str
    src: torch.Tensor | None
    dst: torch.Tensor
    order: torch.Tensor
    start: torch.Tensor
    first: torch.Tensor
    length: torch.Tensor

    def value(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "pairs":
            return _kernels().rotate_pairs(a, w, self.src, self.dst, self.first, self.length)
        return _kernels().rotate_back_sum(a, w, self.order[1], self.start[1], self.first, self.length)

    def grad(self, g: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "pairs":
            return _kernels().rotate_pairs_backward(a, w, g, self.order, self.start, self.first, self.length)
        return _kernels().rotate_back_sum_backward(a, w, g, self.dst, self.first, self.length)


class _Rotation(torch.autograd.Function):
    """y = op.value(a, w), differentiable to any order (training on forces included)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, w: torch.Tensor, op: _RotationOp) -> torch.Tensor:
        a, w = a.contiguous(), w.contiguous()
        ctx.save_for_backward(a, w)
        ctx.op = op
        return op.value(a, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, w = ctx.saved_tensors
        grad_a, grad_w = _RotationGrad.apply(grad, a, w, ctx.op)
        return grad_a, grad_w, None


class _RotationGrad(torch.autograd.Function):
    """(∂/∂a, ∂/∂w) of ⟨g, op.value(a, w)⟩ = op.grad(g, a, w): linear in g, in a (the w-part) and in w (the a-part).

    Its own gradient for incoming (u, v) closes the family: by g, value(u, w) + value(a, v); by a and w together,
    grad(g, u, v) = (∂/∂a of ⟨g, value(·, v)⟩, ∂/∂w of ⟨g, value(u, ·)⟩) — both kernels again.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, a: torch.Tensor, w: torch.Tensor, op: _RotationOp):
        g, a, w = g.contiguous(), a.contiguous(), w.contiguous()
        ctx.save_for_backward(g, a, w)
        ctx.op = op
        return op.grad(g, a, w)

    @staticmethod
    def backward(ctx, u: torch.Tensor, v: torch.Tensor):  # (autograd passes zeros for an unused output)
        g, a, w = ctx.saved_tensors
        grad_g = grad_a = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_g = _Rotation.apply(u, w, ctx.op) + _Rotation.apply(a, v, ctx.op)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_a, grad_w = _RotationGrad.apply(g, u, v, ctx.op)
        return grad_g, grad_a, grad_w, None


def _incidence(src: torch.Tensor, dst: torch.Tensor, num_nodes: int, given: ops.Incidence | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    order, start = given() if given is not None else ops.incidence(src, dst, num_nodes)
    return order.long().contiguous(), start.long().contiguous()


def rotate_pairs(x, rot, src, dst, row_first, row_length, incidence=None):
    """:func:`potentials.accel.ops.rotate_pairs` on the kernels."""
    order, start = _incidence(src, dst, x.shape[0], incidence)
    op = _RotationOp("pairs", src.long().contiguous(), dst.long().contiguous(), order, start,
                     row_first.long().contiguous(), row_length.long().contiguous())
    return _Rotation.apply(x, rot, op)


def rotate_back_sum(msg, rot, dst, num_nodes, row_first, row_length, incidence=None):
    """:func:`potentials.accel.ops.rotate_back_sum` on the kernels."""
    order, start = _incidence(dst, dst, num_nodes, incidence)  # (only the dst half is read)
    op = _RotationOp("back", None, dst.long().contiguous(), order, start, row_first.long().contiguous(),
                     row_length.long().contiguous())
    return _Rotation.apply(msg, rot, op)


def _kernels() -> GridKernels:
    kernels = load()
    if kernels is None:  # chosen by the dispatch only once built
        raise RuntimeError(f"compiled CPU kernels unavailable: {unavailable_reason()}")
    return kernels


class _CpuBackend:
    """The backend behind ``kernels="cpu"`` (and ``"auto"`` on CPU tensors)."""

    OPS = {
        "s2_activation": _GridSiLU.apply,
        "grid_mlp_core": _GridMLPCore.apply,
        "rotate_pairs": rotate_pairs,
        "rotate_back_sum": rotate_back_sum,
    }

    def supports(self, *tensors: torch.Tensor) -> bool:
        return supports(*tensors)

    def unavailable_reason(self) -> str | None:
        return None if load() is not None else unavailable_reason()

    def implementation(self, op: str):
        return self.OPS.get(op)


backends.register("cpu", _CpuBackend())
