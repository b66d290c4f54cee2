"""Writers of OC20's distributed formats, fed with the real frames of the OC20 relaxation trajectory in tests/data.

The trajectory (system random1447590, O* on Rb, RPBE) carries no tags; the writers fill in OC20's tag
convention from its constraint and species: fixed atoms 0 (subsurface), free slab atoms 1 (surface), O 2
(adsorbate). It has no reference energy either, so the S2EF ``.txt`` files carry :data:`REFERENCE`, a value
chosen here; tests check the arithmetic ``energy − reference`` against it.
"""

from __future__ import annotations

import lzma
import pickle
from collections.abc import Sequence
from pathlib import Path

import ase.io
import numpy as np
import torch
import torch_geometric.data.data as pyg_data
from ase import Atoms
from ase.constraints import FixAtoms
from torch_geometric.data import Data

TRAJECTORY = "oc20/oc20_is2res_random1447590.traj"
SID = 1447590
#: Reference energy (eV) written into the S2EF .txt files (the real one is not in the sample).
REFERENCE = -15.25


def load_frames(test_data: Path) -> list[Atoms]:
    """The 47 real frames, tagged with OC20's convention (fixed 0, free slab 1, adsorbate O 2)."""
    frames = ase.io.read(test_data / TRAJECTORY, ":")
    for atoms in frames:
        atoms.set_tags(oc20_tags(atoms))
    return frames


def fixed_mask(atoms: Atoms) -> np.ndarray:
    mask = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            mask[c.get_indices()] = True
    return mask


def oc20_tags(atoms: Atoms) -> np.ndarray:
    tags = np.where(fixed_mask(atoms), 0, 1)
    tags[atoms.numbers == 8] = 2
    return tags


def extxyz_frame(atoms: Atoms, energy: float | None = None, forces: np.ndarray | None = None) -> str:
    """One frame exactly as OC20's S2EF files write it (8 decimals, move_mask and tags columns)."""
    results = atoms.calc.results
    energy = results["energy"] if energy is None else energy
    forces = results["forces"] if forces is None else forces
    free_energy = results.get("free_energy", energy)
    lattice = " ".join(f"{x:.8f}" for x in atoms.cell.array.reshape(-1))
    lines = [str(len(atoms)),
             f'Lattice="{lattice}" Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3 '
             f'energy={energy:.8f} free_energy={free_energy:.8f} pbc="T T T"']
    fixed, tags = fixed_mask(atoms), atoms.get_tags()
    for i, atom in enumerate(atoms):
        x, y, z = atoms.positions[i]
        fx, fy, fz = forces[i]
        lines.append(f"{atom.symbol} {x:.8f} {y:.8f} {z:.8f} {'F' if fixed[i] else 'T'} {tags[i]} "
                     f"{fx:.8f} {fy:.8f} {fz:.8f}")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> Path:
    if path.name.endswith(".xz"):
        with lzma.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def write_s2ef_pair(folder: Path, n: int, frames: Sequence[Atoms], fids: Sequence[int], *, xz: bool = False,
                    reference: float = REFERENCE, sid: int = SID) -> tuple[Path, Path]:
    """``<n>.extxyz`` + ``<n>.txt`` (``.xz`` both when asked) holding ``frames``."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".xz" if xz else ""
    xyz = write_text(folder / f"{n}.extxyz{suffix}", "".join(extxyz_frame(a) for a in frames))
    txt = write_text(folder / f"{n}.txt{suffix}", "".join(f"random{sid},frame{f},{reference:.8f}\n" for f in fids))
    return xyz, txt


def pyg_record(atoms: Atoms, fid: int, *, is2re_relaxed: Atoms | None = None, sid: int = SID) -> Data:
    """A PyG ``Data`` with OC20's LMDB fields (S2EF: y, force; IS2RE: y_init, y_relaxed, pos_relaxed)."""
    fields = dict(pos=torch.tensor(atoms.positions, dtype=torch.float32),
                  cell=torch.tensor(atoms.cell.array, dtype=torch.float32).unsqueeze(0),
                  atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.float32),
                  natoms=len(atoms), tags=torch.tensor(atoms.get_tags(), dtype=torch.long),
                  fixed=torch.tensor(fixed_mask(atoms), dtype=torch.float32), sid=sid)
    if is2re_relaxed is None:
        fields.update(fid=fid, y=float(atoms.calc.results["energy"]),
                      force=torch.tensor(atoms.calc.results["forces"], dtype=torch.float32))
    else:
        fields.update(y_init=float(atoms.calc.results["energy"]),
                      y_relaxed=float(is2re_relaxed.calc.results["energy"]),
                      pos_relaxed=torch.tensor(is2re_relaxed.positions, dtype=torch.float32))
    return Data(**fields)


class LegacyData:
    """Stands in for a PyG 1.x ``Data`` when pickling: fields live in ``__dict__`` (no ``_store``)."""

    def __init__(self, data: Data) -> None:
        self.__dict__.update({key: data[key] for key in data.keys()})
        self.__dict__["__num_nodes__"] = None


def pickle_legacy(data: Data) -> bytes:
    """Pickle ``data`` the way PyG 1.x did: class ``torch_geometric.data.data.Data``, fields in ``__dict__``."""
    legacy = LegacyData(data)
    original = pyg_data.Data
    LegacyData.__module__, LegacyData.__qualname__ = "torch_geometric.data.data", "Data"
    pyg_data.Data = LegacyData
    try:
        return pickle.dumps(legacy, protocol=2)
    finally:
        pyg_data.Data = original
        LegacyData.__module__, LegacyData.__qualname__ = __name__, "LegacyData"


def write_pyg_lmdb(path: Path, values: Sequence[bytes], *, with_length: bool = True) -> Path:
    """An OC20-style LMDB file: keys "0".."N-1" (plus "length") holding the given pickles."""
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=1 << 30, meminit=False)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(str(i).encode("ascii"), value)
        if with_length:
            txn.put(b"length", pickle.dumps(len(values)))
    env.close()
    return path
