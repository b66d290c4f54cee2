"""Material properties of a trained model (or any ASE calculator): Hessian, phonons, elastic constants, EOS.

Units: eV, Å, eV/Å² (Hessian), THz (phonon frequencies), GPa (moduli); stress with ASE's sign (tension positive).
"""

from __future__ import annotations

from potentials.properties.elastic import ElasticResult, elastic_constants
from potentials.properties.eos import EOSResult, birch_murnaghan, equation_of_state, fit_birch_murnaghan
from potentials.properties.hessian import harmonic_frequencies, hessian
from potentials.properties.phonons import PhononResult, phonons
from potentials.properties.symmetry import is_cubic, standard_cell

__all__ = ["EOSResult", "ElasticResult", "PhononResult", "birch_murnaghan", "elastic_constants", "equation_of_state",
           "fit_birch_murnaghan", "harmonic_frequencies", "hessian", "is_cubic", "phonons", "standard_cell"]
