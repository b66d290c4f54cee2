"""PotentialCalculator: an ASE calculator backed by a :class:`~potentials.potential.Potential`."""

from __future__ import annotations

import os

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from torch_geometric.data import Batch

from potentials import accel, keys
from potentials.accel import tune_allocator
from potentials.graph import AtomicGraph
from potentials.physics import KEEP, with_overrides
from potentials.potential import Potential
from potentials.uncertainty import EnsemblePotential


class PotentialCalculator(Calculator):
    """ASE calculator: energy, free_energy and forces; stress (eV/Å³, ASE sign) for fully periodic cells.

    A model with uncertainty (a committee or shallow ensemble, :mod:`potentials.uncertainty`) gives the members'
    mean under those names and, in ``results``, ``energy_std`` (eV), ``forces_std`` ([N], eV/Å, per atom) and
    ``stress_std`` (Voigt 6, eV/Å³, fully periodic cells), calibrated as stored in the model.

    Args:
        potential: the trained potential.
        device: torch device to run on (``"cpu"``, ``"cuda"``, ``"cuda:1"`` …).
        dtype: ``"float32"`` or ``"float64"``.

    Creating one tunes the process's memory allocator for repeated large steps
    (:func:`potentials.accel.tune_allocator`; ``POTENTIALS_MALLOC=system`` opts out).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "energy_std", "forces_std",
                              "stress_std"]

    def __init__(self, potential: Potential | EnsemblePotential, device: str = "cpu", dtype: str = "float32",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        tune_allocator()
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.potential = potential.to(device=self.device, dtype=self.dtype).eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str = "cpu", dtype: str = "float32",
                  cutoff: float | None = None, kernels: str | None = None, zbl: bool | None = None,
                  dispersion: str | None = KEEP, functional: str | None = None, compile: bool | None = None,
                  **kwargs) -> PotentialCalculator:
        """Load a model file written at the end of training (``<run dir>/model.pt``).

        ``cutoff`` (Å), when given, must be the model's training cutoff (see :func:`potentials.export.load`);
        ``kernels``, when given, replaces the file's choice of implementation (see :mod:`potentials.accel`);
        ``compile``, when given, the file's ``runtime.compile`` (``torch.compile``; docs/performance.md).
        ``zbl`` (True/False), ``dispersion`` (``"d3bj"`` or None) and ``functional`` (e.g. ``"pbe"``), when given,
        switch physics terms on at inference (:mod:`potentials.physics`); switching off or changing a term the
        model was trained with raises :class:`~potentials.errors.PotentialsInputError`.
        """
        from potentials.export import load

        potential = load(path, device=device, dtype=dtype, cutoff=cutoff, compile=compile)
        if kernels is not None:
            potential.kernels = accel.backends.check(kernels)
        if zbl is not None or dispersion != KEEP or functional is not None:
            potential.physics = with_overrides(potential.physics, zbl, dispersion, functional)
        return cls(potential, device=device, dtype=dtype, **kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        graph = AtomicGraph.from_atoms(atoms, self.potential.cutoff, dtype=self.dtype)
        self.potential.check_elements(graph.z)
        batch = Batch.from_data_list([graph]).to(self.device)
        want_stress = bool(np.all(atoms.pbc))  # cheap beside forces, and saves a second call
        if "stress" in properties and not want_stress:
            # ASE's own signal for a property a calculator cannot provide (callers such as filters catch it)
            from ase.calculators.calculator import PropertyNotImplementedError

            raise PropertyNotImplementedError("stress is defined only for structures periodic in all directions")
        out = self.potential(batch, compute_forces=True, compute_stress=want_stress)
        energy = float(out[keys.ENERGY].detach().double().sum())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out[keys.NODE_ENERGY].detach().double().cpu().numpy()
        self.results["forces"] = out[keys.FORCES].detach().double().cpu().numpy()
        if want_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out[keys.STRESS][0].detach().double().cpu().numpy())
        if "energy_std" in out:  # a model with uncertainty
            self.results["energy_std"] = float(out["energy_std"].detach().double().sum())
            self.results["forces_std"] = out["forces_std"].detach().double().cpu().numpy()
            if want_stress:
                stress_std = out["stress_std"][0].detach().double().cpu().numpy()
                self.results["stress_std"] = full_3x3_to_voigt_6_stress(stress_std)
