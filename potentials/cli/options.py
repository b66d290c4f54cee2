"""Command-line options shared by the tools that run a trained model (relax, evaluate, md, properties, ...)."""

from __future__ import annotations

import argparse


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """The positional MODEL: a file written by training."""
    p.add_argument("model", help="model file written by training (<run dir>/model.pt)")


def add_runtime_options(p: argparse.ArgumentParser, dtype: str, why: str) -> None:
    """``--device``, ``--dtype`` (default ``dtype``, for the reason ``why``), ``--kernels``, ``--compile``, ``--tf32``
    and ``--no-progress``.  ``main`` applies ``--tf32``; the tools pass ``--compile`` (None: the file's) on."""
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default=dtype, choices=["float32", "float64"], help=f"precision (default {dtype}: {why})")
    p.add_argument("--kernels", choices=["auto", "torch", "cpu"], default=None,
                   help="implementation of the hot operations (default: the model file's; see potentials.accel)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model through torch.compile (default: the model file's; docs/performance.md)")
    p.add_argument("--tf32", action="store_true",
                   help="float32 matrix products in TF32 on CUDA (Ampere+); nothing on CPU or in float64")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_one_structure(path: str, index: str):
    """The frame ``index`` (a string from the command line) of the structure file ``path``; errors exit with a
    one-line message naming the problem."""
    from potentials.structure_io import read_structures

    try:
        number = int(index)
    except ValueError:
        raise SystemExit(f"error: --index takes one frame number, got {index!r}") from None
    try:
        return read_structures(path, number)[0]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def collect_structures_or_exit(paths: list[str]):
    """Every structure in the files and folders ``paths`` (a :class:`~potentials.structure_io.StructureSet`); an
    unreadable file is listed on stderr and skipped, and no readable structure at all exits with an error."""
    import sys

    from potentials.structure_io import collect_structures

    try:
        found = collect_structures(paths)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    for path, reason in found.skipped:
        print(f"skipped {path}: {reason.splitlines()[0][:200]}", file=sys.stderr)
    if not len(found):
        raise SystemExit(f"error: no readable structure in {', '.join(paths)}")
    return found
