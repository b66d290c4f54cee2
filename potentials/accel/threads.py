"""Small steps on one thread where idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``).

With the passive wait policy — the setting for machines shared with other jobs, where spinning threads slow every
process down — OpenMP threads go to sleep as soon as a parallel operation ends, and each parallel operation then
waits for them to wake, whatever its size.  PyTorch runs an element-wise operation in parallel from 32 768 numbers
on and MKL a matrix product of any size, so a model on a few dozen atoms pays that wait hundreds of times per step;
below a size, one thread is faster than several (docs/performance.md).

So a model marks where its steps change size: :func:`enter` (``potentials.accel.mark_steps``) on the tensor that
flows into the next steps, with the number of values they work on.  Inside :func:`small_steps_serial` (which
:class:`~potentials.potential.Potential` opens for force and stress evaluations that do not keep the graph), steps
on at most :func:`serial_threshold` values run on one thread, larger ones on the caller's thread count.  The
switches are autograd functions, so the backward pass switches at the same points, in reverse.  Results are the same
either way up to the summation order of parallel reductions; only the time differs.  Outside that context
(training, direct calls of a model), on GPUs, in threads other than the main one (a thread count set there would
become the default of threads started meanwhile), and with any other wait policy, :func:`enter` returns its argument
untouched.  ``OMP_WAIT_POLICY`` is read as the process's environment has it (libgomp reads it once, when it is
loaded).
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

#: default threshold (numbers per tensor) with the passive wait policy: about where one and two threads break even
DEFAULT_SERIAL_BELOW = 1 << 19

_local = threading.local()


def serial_threshold() -> int:
    """Steps on at most this many values run on one thread inside :func:`small_steps_serial`; 0: never.

    ``POTENTIALS_SERIAL_BELOW`` if set (an integer; 0 turns the switching off), else :data:`DEFAULT_SERIAL_BELOW`
    when ``OMP_WAIT_POLICY`` is ``passive`` (any case), else 0.
    """
    value = os.environ.get("POTENTIALS_SERIAL_BELOW")
    if value is not None and value.strip():
        try:
            return max(int(value), 0)
        except ValueError:
            message = f"POTENTIALS_SERIAL_BELOW must be an integer (numbers per tensor), got {value!r}"
            raise ValueError(message) from None
    return DEFAULT_SERIAL_BELOW if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive" else 0


class _Switch(torch.autograd.Function):
    """Identity on x; sets the thread count to ``forward_threads`` now and to ``backward_threads`` when the backward
    pass reaches this point (where it enters the steps that came before)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_threads: int, backward_threads: int) -> torch.Tensor:
        ctx.backward_threads = backward_threads
        torch.set_num_threads(forward_threads)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        torch.set_num_threads(ctx.backward_threads)
        return grad, None, None


@contextlib.contextmanager
def small_steps_serial(active: bool = True):
    """Within the block (if ``active`` and :func:`serial_threshold` > 0), :func:`enter` switches thread counts.

    Run both the forward and the backward pass inside; the caller's thread count is restored on exit.
    """
    threshold = serial_threshold() if active else 0
    threads = torch.get_num_threads()
    # main thread only: torch.set_num_threads also sets the count that threads starting their first torch work take
    if threshold <= 0 or threads <= 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = getattr(_local, "state", None)
    _local.state = {"threshold": threshold, "threads": threads, "current": threads}
    try:
        yield
    finally:
        _local.state = previous
        torch.set_num_threads(threads)


def enter(x: torch.Tensor, values: int | None = None) -> torch.Tensor:
    """``x``, marked as the input of steps that work on about ``values`` numbers per tensor (default ``x.numel()``).

    Inside :func:`small_steps_serial` this switches to one thread for small steps and back to the caller's count
    for large ones (both ways again in the backward pass); elsewhere it returns ``x`` itself.
    """
    if torch.compiler.is_compiling():  # a compiled graph runs as one step: no thread switches inside it
        return x
    state = getattr(_local, "state", None)
    if state is None or x.device.type != "cpu":
        return x
    size = x.numel() if values is None else int(values)
    want = 1 if size <= state["threshold"] else state["threads"]
    current = state["current"]
    if want == current:
        return x
    state["current"] = want
    if not (torch.is_grad_enabled() and x.requires_grad):  # no backward pass will pass here
        torch.set_num_threads(want)
        return x
    return _Switch.apply(x, want, current)
