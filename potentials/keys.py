"""Every field name used on an :class:`~potentials.graph.AtomicGraph`, with shape, dtype, unit and sign.

Units are eV, Å and eV/Å³ everywhere inside the package; adapters convert once, at the boundary.

Edge direction convention: ``edge_index[0]`` is the source ``j`` (the neighbour) and ``edge_index[1]`` the
target ``i`` (the centre); messages flow j → i.  The edge vector points from the centre to the neighbour::

    edge_vec[e] = pos[j] + cell_offsets[e] @ cell[batch[j]] - pos[i]        (Å)
"""

from __future__ import annotations

#: [N, 3] float, Cartesian positions, Å.
POS = "pos"
#: [N] long, atomic numbers.
Z = "z"
#: [B, 3, 3] float, lattice vectors as rows, Å; zeros where no direction is periodic.
CELL = "cell"
#: [B, 3] bool, periodic directions.
PBC = "pbc"
#: [2, E] long, (source j, target i).
EDGE_INDEX = "edge_index"
#: [E, 3] float, integer image of the neighbour j (stored as float so it multiplies the cell directly).
CELL_OFFSETS = "cell_offsets"
#: [E, 3] float, r_ij = pos[j] + offsets·cell − pos[i], Å (computed, never stored on disk).
EDGE_VEC = "edge_vec"
#: [N] long, index of the structure each atom belongs to (PyG).
BATCH = "batch"

#: [B] float, total energy, eV.
ENERGY = "energy"
#: [N] float, per-atom energy contributions, eV (model output after scale/shift and references).
NODE_ENERGY = "node_energy"
#: [N, 3] float, eV/Å, forces = −∂E/∂pos.
FORCES = "forces"
#: [B, 3, 3] float, eV/Å³, ASE sign: σ = (1/V)·∂E/∂ε (positive = tensile, the cell wants to shrink).
#: NaN where a structure has no stress label or is not periodic.
STRESS = "stress"
#: [B, 3, 3] float, eV, virial W = −∂E/∂ε = −V·σ.
VIRIAL = "virial"
#: [N, K] float, per-atom energies of each readout head of a shallow ensemble (model output, model units).
NODE_ENERGY_HEADS = "node_energy_heads"
#: [B, K] float, eV, the energy of each head of a shallow ensemble (``energy`` is their mean).
ENERGY_HEADS = "energy_heads"
#: [K, N, 3] float, eV/Å, the forces of each head of a shallow ensemble (``forces`` is their mean).
FORCES_HEADS = "forces_heads"
#: [K, B, 3, 3] float, eV/Å³ and eV, the stress and virial of each head of a shallow ensemble.
STRESS_HEADS = "stress_heads"
VIRIAL_HEADS = "virial_heads"

#: [N] bool, atoms held fixed (OC20 subsurface atoms, ASE FixAtoms); zeros elsewhere.
FIXED = "fixed"
#: [N] long, OC20 tags: 0 subsurface, 1 surface, 2 adsorbate; zeros elsewhere.
TAGS = "tags"
#: [B] long, atoms per structure.
NUM_ATOMS = "num_atoms"

#: Per-structure label masks, [B] bool: whether the structure carries that label.
HAS_ENERGY = "has_energy"
HAS_FORCES = "has_forces"
HAS_STRESS = "has_stress"

LABEL_KEYS = (ENERGY, FORCES, STRESS)
