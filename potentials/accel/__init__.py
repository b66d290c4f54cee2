"""Acceleration in one place: compiled CPU kernels, the thread policy of small steps, the allocator tuning.

Operations.  Models call the plain-PyTorch reference operations of :mod:`potentials.accel.ops` (the S² activation,
the grid-MLP core, the rotations into and out of the edge frames).  A backend registered for those operations
(:mod:`potentials.accel.cpu`: C++ kernels compiled on first use and cached) runs them instead where the ``kernels``
choice allows:

* ``"auto"`` (the default): the compiled kernels where they build and the operands are CPU tensors of float32 or
  float64; the reference elsewhere (GPUs, other dtypes; a warning, once, when the kernels do not build);
* ``"torch"``: always the reference;
* ``"cpu"``: the compiled kernels, or :class:`KernelsUnavailable` saying why not.

The choice is ``Potential(..., kernels=...)`` (saved in model files; ``kernels:`` in the training config,
``--kernels`` for the command-line tools); :class:`~potentials.potential.Potential` runs its model inside
``with backend(self.kernels):``.  Results agree between the backends to round-off.

Threads.  :func:`small_steps_serial` and :func:`mark_steps` run a model's small steps on one thread where OpenMP
threads sleep between operations (:mod:`potentials.accel.threads`).

Memory.  :func:`tune_allocator` makes glibc keep freed memory for reuse (:mod:`potentials.accel.allocator`).

Environment.  These variables override or complete the options above; the first wins over the option it names:

* ``POTENTIALS_KERNELS=auto|torch|cpu`` (also ``off`` = ``torch``): replaces every ``kernels`` choice in the
  process, the one in a model file or given to ``Potential`` included (a warning names the variable when it
  overrides an explicit choice, and errors under ``cpu`` name it as the source);
* ``POTENTIALS_KERNEL_CACHE=<folder>``: where compiled kernels are kept (else ``$XDG_CACHE_HOME/potentials/kernels``,
  else ``~/.cache/potentials/kernels``); ``CXX``: the compiler (else ``c++``);
* ``POTENTIALS_SERIAL_BELOW=<numbers>``: the size up to which steps run on one thread; replaces the default that
  ``OMP_WAIT_POLICY`` implies (0: never);
* ``POTENTIALS_MALLOC=system``: leaves glibc's allocator settings alone.
"""

from __future__ import annotations

from potentials.accel.allocator import tune_allocator
from potentials.accel.backends import CHOICES, KernelsUnavailable, backend, current, register
from potentials.accel.threads import enter as mark_steps
from potentials.accel.threads import small_steps_serial

__all__ = ["CHOICES", "KernelsUnavailable", "backend", "current", "mark_steps", "register", "small_steps_serial",
           "tune_allocator"]
