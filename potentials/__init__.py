"""potentials: train machine-learned interatomic potentials and use them from ASE.

Units everywhere: eV, Å, eV/Å, eV/Å³ (ASE's stress sign).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["AtomicGraph", "Potential", "PotentialCalculator", "hessian", "load", "__version__"]


def __getattr__(name: str):
    # imported lazily so `import potentials` stays cheap (torch is only loaded when used)
    if name == "AtomicGraph":
        from potentials.graph import AtomicGraph

        return AtomicGraph
    if name == "Potential":
        from potentials.potential import Potential

        return Potential
    if name == "PotentialCalculator":
        from potentials.calculator import PotentialCalculator

        return PotentialCalculator
    if name == "hessian":
        from potentials.properties.hessian import hessian

        return hessian
    if name == "load":
        from potentials.export import load

        return load
    raise AttributeError(f"module 'potentials' has no attribute {name!r}")
