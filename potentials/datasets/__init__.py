"""Dataset adapters: each reads one source and returns ``ase.Atoms`` with labels in eV, eV/Å and eV/Å³.

Modules: :mod:`~potentials.datasets.md17` (MD17 / rMD17 npz), :mod:`~potentials.datasets.ase_files`
(anything ``ase.io`` reads), :mod:`~potentials.datasets.emt` (the embedded EMT metal dataset) and
:mod:`~potentials.datasets.validate` (shared label checks).
"""
