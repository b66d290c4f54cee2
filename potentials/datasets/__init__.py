"""Dataset adapters: each reads one source and returns ``ase.Atoms`` with labels in eV, eV/Å and eV/Å³.

Modules: :mod:`~potentials.datasets.md17` (MD17 / rMD17 npz), :mod:`~potentials.datasets.ase_files`
(anything ``ase.io`` reads), :mod:`~potentials.datasets.emt` (the embedded EMT metal dataset),
:mod:`~potentials.datasets.mptrj` (MPtrj JSON or ASE database, streamed), :mod:`~potentials.datasets.oc20`
(OC20 S2EF/IS2RE extxyz+txt, trajectories, LMDB, ASE-LMDB; with :mod:`~potentials.datasets.pyg_lmdb` and
:mod:`~potentials.datasets.aselmdb` for the two LMDB layouts) and :mod:`~potentials.datasets.validate` (shared
label checks and the report of skipped records).
"""
