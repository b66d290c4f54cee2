"""pymatgen interoperability: the calculator on converted structures, and `potentials relax` with CIF and POSCAR."""

from __future__ import annotations

import ase
import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar

from potentials.calculator import PotentialCalculator
from potentials.cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cu(seed: int) -> Structure:
    """Conventional fcc Cu (4 atoms), every site displaced by 0.06 Å in a random direction."""
    structure = Structure(Lattice.cubic(3.63), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return structure.perturb(0.06, min_distance=0.06, seed=seed)


def test_calculator_on_a_structure_converted_by_ase_atoms_adaptor(cu_model):
    structure = _cu(0)
    atoms = AseAtomsAdaptor.get_atoms(structure)
    calc = PotentialCalculator.from_file(cu_model, dtype="float64")
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    assert forces.shape == (4, 3) and stress.shape == (6,)
    # the same structure built by hand from pymatgen's lattice and Cartesian coordinates gives the same answer
    manual = ase.Atoms("Cu4", positions=structure.cart_coords, cell=structure.lattice.matrix, pbc=True)
    manual.calc = calc
    assert manual.get_potential_energy() == pytest.approx(energy, abs=1e-10)
    np.testing.assert_allclose(manual.get_forces(), forces, atol=1e-10)
    np.testing.assert_allclose(manual.get_stress(), stress, atol=1e-10)
    assert np.abs(forces).max() > 0.05 and abs(forces.sum(axis=0)).max() < 1e-8  # displaced: forces, summing to 0
    # and back: pymatgen keeps the results ASE computed
    back = AseAtomsAdaptor.get_structure(atoms)
    assert len(back) == 4 and back.lattice.abc == pytest.approx(structure.lattice.abc)


@pytest.mark.parametrize(("fmt", "suffix"), [("cif", ".cif"), ("poscar", ".vasp")])
def test_relax_reads_and_writes_files_pymatgen_reads(cu_model, tmp_path, capsys, fmt, suffix):
    structure = _cu(1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    CifWriter(structure).write_file(inputs / "cu_cif.cif")
    Poscar(structure).write_file(inputs / "POSCAR")
    out = tmp_path / "out"
    code = main(["relax", str(cu_model), str(inputs), "--cell", "--fmax", "0.03", "--out", str(out), "--format", fmt,
                 "--no-progress"])
    assert code == 0, capsys.readouterr().out
    calc = PotentialCalculator.from_file(cu_model, dtype="float64")
    for name in ("in_poscar", "cu_cif"):  # a file named POSCAR is named after its folder
        relaxed = Structure.from_file(out / f"{name}_relaxed{suffix}")
        assert relaxed.composition.reduced_formula == "Cu" and len(relaxed) == 4
        assert relaxed.lattice.abc != pytest.approx(structure.lattice.abc, abs=1e-3)  # the cell relaxed too
        atoms = AseAtomsAdaptor.get_atoms(relaxed)
        atoms.calc = calc
        assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.035  # CIF rounds coordinates a little
