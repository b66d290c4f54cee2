"""Neighbour lists against ase.neighborlist.neighbor_list, and graph round trips."""

from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list as ase_neighbor_list

from potentials.graph import AtomicGraph
from potentials.neighbors import edge_vectors, neighbor_list


def _triclinic() -> ase.Atoms:
    rng = np.random.default_rng(0)
    cell = np.array([[4.0, 0.0, 0.0], [2.9, 3.1, 0.0], [-1.7, 1.2, 3.3]])  # strongly skewed
    return ase.Atoms("Cu3Al2", scaled_positions=rng.random((5, 3)), cell=cell, pbc=True)


def _structures() -> dict[str, ase.Atoms]:
    rng = np.random.default_rng(1)
    mol = ase.build.molecule("CH3CH2OH")
    bulk = ase.build.bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    bulk.positions += rng.normal(0, 0.05, bulk.positions.shape)
    tiny = ase.build.bulk("Cu", "fcc", a=3.6)  # 1 atom, cell << cutoff: many self-images
    slab = ase.build.fcc111("Pt", size=(2, 2, 3), vacuum=6.0)  # pbc T T F
    wire = ase.Atoms("Au2", positions=[[0, 0, 0], [1.4, 1.4, 1.2]], cell=[10, 10, 2.6], pbc=[False, False, True])
    outside = _triclinic()
    outside.positions += np.array([9.0, -7.0, 5.5])  # atoms far outside the home cell
    return {"molecule": mol, "bulk": bulk, "tiny": tiny, "slab": slab, "wire": wire,
            "triclinic": _triclinic(), "unwrapped": outside}


def _as_set(i, j, shifts) -> set:
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shifts, strict=True)}


@pytest.mark.parametrize("name", sorted(_structures()))
@pytest.mark.parametrize("cutoff", [2.5, 5.0, 7.0])
def test_matches_ase(name, cutoff):
    atoms = _structures()[name]
    ei, ej, es = ase_neighbor_list("ijS", atoms, cutoff)
    edge_index, offsets = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    ours = _as_set(edge_index[1], edge_index[0], offsets)
    assert ours == _as_set(ei, ej, es)
    assert len(ours) == edge_index.shape[1]  # no duplicates


def test_edge_vectors_and_distances_match_ase():
    atoms = _structures()["triclinic"]
    d_ase = np.sort(ase_neighbor_list("d", atoms, 6.0))
    g = AtomicGraph.from_atoms(atoms, 6.0, dtype=torch.float64)
    vec = edge_vectors(g.pos, g.edge_index, g.cell_offsets, g.cell)
    np.testing.assert_allclose(np.sort(vec.norm(dim=1).numpy()), d_ase, rtol=1e-12)
    assert float(vec.norm(dim=1).max()) < 6.0


def test_tiny_cell_sees_its_own_images():
    atoms = _structures()["tiny"]
    edge_index, offsets = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)
    assert (edge_index == 0).all() and edge_index.shape[1] == 42  # fcc: 12 + 6 + 24 neighbours within 5 Å
    assert not (offsets == 0).all(axis=1).any()  # never the atom itself


def test_graph_round_trip_keeps_labels_and_constraints():
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    slab = _structures()["slab"]
    slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    slab.set_tags(np.arange(len(slab)) % 3)
    slab.calc = EMT()
    slab.get_forces()
    g = AtomicGraph.from_atoms(slab, 4.0, dtype=torch.float64)
    g.validate()
    assert bool(g.has_energy) and bool(g.has_forces) and not bool(g.has_stress)  # slab: no stress label
    back = g.to_atoms()
    np.testing.assert_allclose(back.get_potential_energy(), slab.get_potential_energy())
    np.testing.assert_allclose(back.get_forces(apply_constraint=False), slab.get_forces(apply_constraint=False))
    assert back.constraints[0].get_indices().tolist() == [0, 1, 2, 3]
    assert back.get_tags().tolist() == slab.get_tags().tolist()


def test_zero_volume_cell_is_a_clear_error():
    atoms = ase.Atoms("Cu2", positions=[[0, 0, 0], [1, 1, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    with pytest.raises(ValueError, match="zero volume"):
        AtomicGraph.from_atoms(atoms, 4.0)


def test_validate_names_the_field():
    g = AtomicGraph.from_atoms(ase.build.molecule("H2O"), 3.0)
    g.pos[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'pos'"):
        g.validate("water.xyz frame 3")
