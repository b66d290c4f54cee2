"""Whether the graph being built will ever be differentiated with respect to the model's parameters.

Built-in operations compute only the gradients a backward pass asks for; a custom autograd Function cannot tell
which ones are asked for and computes a gradient for every input that requires one.  :class:`~potentials.potential.
Potential` builds the model's graph inside :func:`inputs_only` when the energy is differentiated with respect to
positions and strain alone, without keeping the graph (forces and stress in inference and validation: nothing can
ask for parameter gradients afterwards).  Custom Functions then take their parameters as constants
(:func:`parameter`), which spares the EquiformerV2 grid MLP one matrix product per layer.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()


@contextlib.contextmanager
def inputs_only(active: bool = True):
    """Within the block (if ``active``), :func:`parameter` detaches parameters."""
    previous = getattr(_local, "inputs_only", False)
    _local.inputs_only = active
    try:
        yield
    finally:
        _local.inputs_only = previous


def parameter(weight: torch.Tensor) -> torch.Tensor:
    """``weight``, detached inside :func:`inputs_only` (for passing a parameter to a custom autograd Function)."""
    if torch.compiler.is_compiling():  # compiled graphs compute only the gradients asked for anyway
        return weight
    return weight.detach() if getattr(_local, "inputs_only", False) else weight
