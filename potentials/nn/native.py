"""Compiled CPU kernels, built on first use with the machine's C++ compiler: the fused S² grid activation, the
grid MLP's point-wise steps and the rotations of the message passing (into the edge frames and back).

Why.  EquiformerV2's S² activation maps every edge's coefficients to values on a sphere grid, applies SiLU and
maps back: for 500 Cu atoms that is 21 000 edges × 64 channels × 42 grid points, 56 M values per layer, each
written to memory and read back by several tensor operations (and more in the gradient).  The kernel in
``grid_kernels.cpp`` does the whole round trip for one tile of channels of one edge at a time, with the grid values
in the L1 cache, directly on the [B, K, C] layout (no transposed copies).  Measured on that Cu500 layer (float32,
2 threads): forward 71 → 26 ms, gradient 104 → 35 ms, the gradient's derivative (training on forces) 240 → 63 ms.
Likewise each layer's message input, bmm(rot, [x_src, x_dst]) per edge, is computed from the node features without
the gathered [E, K, 2C] copy, reading only the degree blocks of the rotation (35 of 81 entries at lmax 2), and its
gradient node by node (no scattered additions): 20 → 7 ms forward, 64 → 24 ms with the gradient on that layer;
and the messages are rotated back and summed into their centres node by node (12–16 → 6–7 ms with the gradient).
Both are bilinear, and so are their gradients: the derivatives of any order are these kernels again (see
``potentials.models.equiformer.attention``).

Build.  ``c++ -O3 -march=native -fopenmp -shared`` into a cache folder (``$POTENTIALS_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/potentials/kernels``, else ``~/.cache/potentials/kernels``), keyed by a hash of the source, the
compiler's version, the flags and the CPU's features, so a shared home folder never hands one machine another's
build; about a second, once.  The compiler is ``$CXX`` if set, else ``c++``; a compiler that rejects
``-march=native`` or ``-fopenmp`` gets a build without them (a serial one without OpenMP).  The library links
libgomp by its soname; with PyTorch's wheels, which ship ``libgomp.so.1``, that is the runtime PyTorch has loaded
(a PyTorch built on another OpenMP runtime would bring a second thread pool).  It runs on
``torch.get_num_threads()`` threads.

Fallback.  On GPU tensors or other dtypes, and with ``POTENTIALS_KERNELS=off``, callers use their
tensor-operation path, which computes the same values (to round-off: the kernel's exp is its own, within 2–3 ulp).
When the kernels cannot be built (no compiler, no writable cache folder, compiler errors) that path is used too, and
a warning says why, once.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("grid_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
#: what build() tries, in order
FLAG_SETS = (FLAGS, tuple(f for f in FLAGS if f != "-march=native"),
             tuple(f for f in FLAGS if f not in ("-march=native", "-fopenmp")))

_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_state: dict = {"lib": None, "error": None, "tried": False, "disabled": 0}


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


def grid_kernels(*tensors: torch.Tensor) -> GridKernels | None:
    """The compiled kernels if they apply to ``tensors`` (all on the CPU, float32 or float64, one dtype) and can be
    built here; None otherwise (the caller then uses tensor operations)."""
    if _state["disabled"] or os.environ.get("POTENTIALS_KERNELS", "on").lower() in ("off", "0", "false", "no"):
        return None
    if not tensors or any(t.device.type != "cpu" or t.dtype != tensors[0].dtype for t in tensors):
        return None
    if tensors[0].dtype not in _DTYPES:
        return None
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
            log.warning("compiled CPU kernels unavailable, using tensor operations instead (same results, slower): "
                        "%s", err)
    return _state["lib"]


def unavailable_reason() -> str | None:
    """Why the kernels could not be built (None if they were, or were not tried yet)."""
    return _state["error"]


@contextlib.contextmanager
def kernels_disabled():
    """Within the block, :func:`grid_kernels` returns None (for comparing the two paths)."""
    _state["disabled"] += 1
    try:
        yield
    finally:
        _state["disabled"] -= 1


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
