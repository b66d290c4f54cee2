"""Which implementation of the reference operations (:mod:`potentials.accel.ops`) runs: the ``kernels`` choice.

A choice is active in a thread between entering and leaving :func:`backend`; outside any such block it is
``"auto"``.  ``POTENTIALS_KERNELS``, when set, replaces every choice (see the package docstring).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

log = logging.getLogger(__name__)

#: the values of ``Potential(kernels=...)``: compiled kernels where they apply, plain torch, compiled kernels required
CHOICES = ("auto", "torch", "cpu")
#: the environment variable that overrides every choice
ENV = "POTENTIALS_KERNELS"
# values the variable took before it named a choice: off/on
_ENV_ALIASES = {"off": "torch", "0": "torch", "false": "torch", "no": "torch", "on": "auto", "1": "auto",
                "true": "auto", "yes": "auto"}

_local = threading.local()
_registry: dict[str, Backend] = {}
_announced: set[tuple[str, str]] = set()


class KernelsUnavailable(RuntimeError):
    """``kernels="cpu"`` was asked for and the compiled kernels cannot run (not built, or not these operands)."""


class Backend(Protocol):
    """A set of compiled implementations of reference operations."""

    def supports(self, *tensors: torch.Tensor) -> bool:
        """Whether it can run on these floating-point operands (device, dtype)."""

    def unavailable_reason(self) -> str | None:
        """None when it is ready (building or loading it on the first call), else why it cannot run."""

    def implementation(self, op: str) -> Callable | None:
        """Its version of the reference operation named ``op``, or None."""


def register(name: str, implementation: Backend) -> None:
    """Make ``implementation`` the backend behind ``kernels=name``."""
    _registry[name] = implementation


def check(choice: str) -> str:
    """``choice`` if it is one of :data:`CHOICES`, else a ValueError that lists them."""
    if choice not in CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, CHOICES))}, got {choice!r}")
    return choice


@contextlib.contextmanager
def backend(choice: str = "auto") -> Iterator[None]:
    """Within the block (in this thread), the reference operations run as ``choice`` says (one of :data:`CHOICES`).

    Autograd functions keep the implementation they were called with, so a backward pass outside the block (a
    training loss) runs the same code as its forward pass.
    """
    choice = check(choice)
    previous = getattr(_local, "choice", None)
    _local.choice = choice
    try:
        yield
    finally:
        _local.choice = previous


def env_override() -> str | None:
    """The choice ``POTENTIALS_KERNELS`` sets, or None when it is unset or empty."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    value = _ENV_ALIASES.get(value, value)
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)} (or off), got {os.environ[ENV]!r}")
    return value


def current() -> tuple[str, str]:
    """(the choice in force, where it comes from: ``"POTENTIALS_KERNELS"``, ``"kernels='…'"`` or ``"default"``)."""
    explicit = getattr(_local, "choice", None)
    override = env_override()
    if override is not None:
        if explicit is not None and explicit != override and (override, explicit) not in _announced:
            _announced.add((override, explicit))
            log.warning("%s=%s overrides kernels=%r", ENV, os.environ[ENV], explicit)
        return override, ENV
    if explicit is not None:
        return explicit, f"kernels={explicit!r}"
    return "auto", "default"


def implementation(op: str, *tensors: torch.Tensor) -> Callable | None:
    """The compiled version of the reference operation ``op`` for these floating-point operands under the current
    choice, or None for the reference itself.

    Raises:
        KernelsUnavailable: the choice is ``"cpu"`` and the kernels cannot be built, or do not apply to the operands.
    """
    choice, source = current()
    if choice == "torch":
        return None
    named = f"kernels={choice!r}" + (f" (from {ENV})" if source == ENV else "")
    compiled = _backend("cpu")
    if not compiled.supports(*tensors):
        if choice == "cpu":
            got = ", ".join(sorted({f"{t.dtype} on {t.device}" for t in tensors}))
            raise KernelsUnavailable(f"{named} runs the compiled kernels on CPU tensors of "
                                     f"float32 or float64 (one dtype); {op} got {got}: use kernels='auto' or 'torch'")
        return None
    reason = compiled.unavailable_reason()
    if reason is not None:
        if choice == "cpu":
            raise KernelsUnavailable(f"{named}: the compiled CPU kernels are unavailable: "
                                     f"{reason}")
        if ("auto", reason) not in _announced:
            _announced.add(("auto", reason))
            log.warning("compiled CPU kernels unavailable, using tensor operations instead (same results, slower): "
                        "%s", reason)
        return None
    return compiled.implementation(op)


def _backend(name: str) -> Backend:
    if name not in _registry and name == "cpu":
        import potentials.accel.cpu  # noqa: F401 - registers itself
    return _registry[name]
