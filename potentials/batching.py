"""What batched relaxation and batched MD share: one graph per structure at its current geometry, the first-fit
filling of a batch bounded by structures and atoms, and one model call for the whole batch split back per
structure (:mod:`potentials.batch_relax`, :mod:`potentials.batch_md`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ase
import numpy as np
import torch
from torch_geometric.data import Batch

from potentials import keys
from potentials.graph import AtomicGraph
from potentials.neighbors import neighbor_list


def structure_graph(positions: np.ndarray, cell: np.ndarray, atoms: ase.Atoms, cutoff: float,
                    dtype: torch.dtype) -> AtomicGraph:
    """The radius graph of ``atoms`` (its numbers and pbc) at ``positions`` [n, 3] Å in ``cell`` [3, 3] Å.

    Raises:
        ValueError: the neighbour search rejects the geometry (e.g. a cell too deformed).
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = cell if pbc.any() else np.zeros((3, 3))
    edge_index, offsets = neighbor_list(positions, cell, pbc, cutoff)
    return AtomicGraph(pos=torch.tensor(positions, dtype=dtype), z=torch.from_numpy(atoms.numbers.astype(np.int64)),
                       cell=torch.tensor(cell, dtype=dtype).unsqueeze(0), pbc=torch.from_numpy(pbc).unsqueeze(0),
                       edge_index=torch.from_numpy(edge_index), cell_offsets=torch.from_numpy(offsets).to(dtype),
                       num_atoms=torch.tensor([len(atoms)]))


def first_fit(pending: Sequence[int], sizes: Sequence[int], n_active: int, atoms_active: int, batch_size: int,
              max_atoms: float) -> list[int]:
    """The waiting structures (indices into ``sizes``, taken in the order of ``pending``) that join a batch already
    holding ``n_active`` structures of ``atoms_active`` atoms: at most ``batch_size`` structures and ``max_atoms``
    atoms in all, except that a structure larger than ``max_atoms`` enters an empty batch alone."""
    admitted = []
    for index in pending:
        if n_active >= batch_size:
            break
        size = sizes[index]
        if n_active and atoms_active + size > max_atoms:
            continue
        admitted.append(index)
        n_active += 1
        atoms_active += size
    return admitted


@dataclass
class BatchOutput:
    """One model call on a batch, as float64 numpy arrays: ``energy`` [B] eV, ``forces`` [N, 3] eV/Å,
    ``node_energy`` [N] eV, ``stress`` [B, 3, 3] eV/Å³ (None without stress) and, for a model with uncertainty,
    ``forces_std`` [N] eV/Å (None otherwise); ``offsets`` [B + 1] splits the atom arrays per structure."""

    energy: np.ndarray
    forces: np.ndarray
    node_energy: np.ndarray | None
    stress: np.ndarray | None
    forces_std: np.ndarray | None
    offsets: np.ndarray

    def atoms_of(self, b: int) -> slice:
        return slice(int(self.offsets[b]), int(self.offsets[b + 1]))


def evaluate(potential, graphs: Sequence[AtomicGraph], *, stress: bool) -> BatchOutput:
    """Energies and forces (and stress with ``stress``) of ``graphs`` in one call of ``potential`` (already on its
    device and dtype)."""
    device = next(iter(potential.buffers())).device
    out = potential(Batch.from_data_list(list(graphs)).to(device), compute_forces=True, compute_stress=stress)

    def array(key: str) -> np.ndarray | None:
        return out[key].detach().double().cpu().numpy() if key in out else None

    sizes = [int(g.num_atoms) for g in graphs]
    return BatchOutput(array(keys.ENERGY), array(keys.FORCES), array(keys.NODE_ENERGY),
                       array(keys.STRESS) if stress else None, array("forces_std"),
                       np.concatenate([[0], np.cumsum(sizes)]))
