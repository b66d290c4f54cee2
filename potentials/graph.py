"""The central structure: :class:`AtomicGraph`, a PyG ``Data`` holding one structure and its neighbour graph."""

from __future__ import annotations

import math

import ase
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from torch_geometric.data import Data

from potentials import keys
from potentials.errors import PotentialsInputError
from potentials.neighbors import edge_vectors, neighbor_list

_NAN33 = [[math.nan] * 3] * 3
#: Closest distance (Å) two atoms, or an atom and a periodic image, may have in a valid structure.
MIN_DISTANCE = 0.1


def _labels(atoms: ase.Atoms) -> dict:
    """Energy/forces/stress from the attached calculator's results, without triggering a calculation."""
    calc = atoms.calc
    results = dict(getattr(calc, "results", {}) or {}) if calc is not None else {}
    out = {}
    if results.get("energy") is not None:
        out["energy"] = float(results["energy"])
    if results.get("forces") is not None:
        out["forces"] = np.asarray(results["forces"], dtype=np.float64).reshape(len(atoms), 3)
    if results.get("stress") is not None:
        s = np.asarray(results["stress"], dtype=np.float64)
        out["stress"] = voigt_6_to_full_3x3_stress(s) if s.shape == (6,) else s.reshape(3, 3)
    return out


def _fixed_mask(atoms: ase.Atoms) -> np.ndarray:
    fixed = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = True
    return fixed


class AtomicGraph(Data):
    """One atomic structure with its periodic radius graph (fields and units: :mod:`potentials.keys`)."""

    @classmethod
    def from_atoms(cls, atoms: ase.Atoms, cutoff: float, dtype: torch.dtype | None = None) -> AtomicGraph:
        """Build the graph of ``atoms`` with all neighbours closer than ``cutoff`` Å.

        Labels found on ``atoms.calc`` (energy eV, forces eV/Å, stress eV/Å³ with ASE's sign) are copied, with masks
        ``has_energy``/``has_forces``/``has_stress``; missing ones are NaN.  Stress is only kept for fully periodic
        structures.

        Args:
            atoms: the structure.
            cutoff: neighbour radius, Å.
            dtype: floating dtype of positions, cell and labels (default: torch's default dtype).
        """
        dtype = dtype or torch.get_default_dtype()
        n = len(atoms)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.asarray(atoms.cell.array, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
        pos = np.asarray(atoms.positions, dtype=np.float64)
        edge_index, offsets = neighbor_list(pos, cell, pbc, cutoff)
        lab = _labels(atoms)
        has_stress = "stress" in lab and bool(pbc.all())
        tags = atoms.get_tags() if atoms.has("tags") else np.zeros(n, dtype=np.int64)
        return cls(
            pos=torch.tensor(pos, dtype=dtype),
            z=torch.tensor(atoms.numbers, dtype=torch.long),
            cell=torch.tensor(cell, dtype=dtype).unsqueeze(0),
            pbc=torch.tensor(pbc).unsqueeze(0),
            edge_index=torch.from_numpy(edge_index),
            cell_offsets=torch.from_numpy(offsets).to(dtype),
            energy=torch.tensor([lab.get("energy", math.nan)], dtype=dtype),
            forces=torch.tensor(lab["forces"], dtype=dtype) if "forces" in lab else torch.full((n, 3), math.nan,
                                                                                                  dtype=dtype),
            stress=torch.tensor(lab["stress"] if has_stress else _NAN33, dtype=dtype).unsqueeze(0),
            has_energy=torch.tensor(["energy" in lab]),
            has_forces=torch.tensor(["forces" in lab]),
            has_stress=torch.tensor([has_stress]),
            fixed=torch.from_numpy(_fixed_mask(atoms)),
            tags=torch.as_tensor(np.asarray(tags, dtype=np.int64)),
            num_atoms=torch.tensor([n]),
        )

    def to_atoms(self) -> ase.Atoms:
        """The structure back as ``ase.Atoms`` (one graph only), labels on a SinglePointCalculator."""
        if getattr(self, "num_graphs", 1) != 1 and hasattr(self, "batch") and self.batch is not None:
            raise ValueError("to_atoms() takes a single graph; use Batch.to_data_list() first")
        pbc = self.pbc.reshape(3).cpu().numpy()
        atoms = ase.Atoms(
            numbers=self.z.cpu().numpy(),
            positions=self.pos.detach().cpu().double().numpy(),
            cell=self.cell.reshape(3, 3).detach().cpu().double().numpy(),
            pbc=pbc,
        )
        if self.fixed.any():
            atoms.set_constraint(FixAtoms(mask=self.fixed.cpu().numpy()))
        atoms.set_tags(self.tags.cpu().numpy())
        results = {}
        if bool(self.has_energy):
            results["energy"] = float(self.energy)
        if bool(self.has_forces):
            results["forces"] = self.forces.detach().cpu().double().numpy()
        if bool(self.has_stress):
            results["stress"] = full_3x3_to_voigt_6_stress(self.stress.reshape(3, 3).detach().cpu().double().numpy())
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    def validate(self, where: str = "graph") -> None:
        """Raise :class:`PotentialsInputError` (a ``ValueError``) naming ``where`` and the field if shapes, dtypes or
        values are inconsistent, or the structure has no atoms."""
        n = self.pos.shape[0]
        if n == 0:
            raise PotentialsInputError(f"{where}: field '{keys.POS}': the structure has no atoms")
        checks = [
            (self.pos.shape == (n, 3), keys.POS, f"shape {tuple(self.pos.shape)}, expected ({n}, 3)"),
            (self.z.shape == (n,), keys.Z, f"shape {tuple(self.z.shape)}, expected ({n},)"),
            (bool(((self.z >= 1) & (self.z <= 118)).all()), keys.Z, "atomic numbers outside 1..118"),
            (bool(torch.isfinite(self.pos).all()), keys.POS, "non-finite positions"),
            (self.edge_index.shape[0] == 2, keys.EDGE_INDEX, "must have shape [2, E]"),
            (self.cell_offsets.shape == (self.edge_index.shape[1], 3), keys.CELL_OFFSETS,
             "one integer image per edge expected"),
        ]
        if self.edge_index.numel():
            checks.append((int(self.edge_index.max()) < n and int(self.edge_index.min()) >= 0, keys.EDGE_INDEX,
                           "indices out of range"))
        for field in (keys.ENERGY, keys.FORCES, keys.STRESS):
            mask = getattr(self, f"has_{field}")
            if bool(mask.all()):
                checks.append((bool(torch.isfinite(getattr(self, field)).all()), field, "non-finite label"))
        for ok, field, msg in checks:
            if not ok:
                raise PotentialsInputError(f"{where}: field '{field}': {msg}")

    def check_distances(self, where: str = "graph") -> None:
        """Raise :class:`PotentialsInputError` if two atoms, or an atom and a periodic image, are closer than
        :data:`MIN_DISTANCE` (overlapping or duplicated atoms), naming ``where``, both atoms and the distance."""
        if self.edge_index.numel():
            j, i = self.edge_index
            cell = self.cell.reshape(-1, 3, 3).double()
            dist = edge_vectors(self.pos.double(), self.edge_index, self.cell_offsets, cell).norm(dim=1)
            e = int(dist.argmin())
            if float(dist[e]) < MIN_DISTANCE:
                offset = [int(x) for x in self.cell_offsets[e].tolist()]
                image = f" (periodic image {offset})" if any(offset) else ""
                raise PotentialsInputError(
                    f"{where}, field 'positions': atoms {int(i[e])} and {int(j[e])}{image} are {float(dist[e]):.3g} Å "
                    f"apart, closer than {MIN_DISTANCE} Å: overlapping or duplicated atoms")
