"""Material properties against ASE's EMT copper as the exact reference, and the phonons/elastic/eos commands."""

from __future__ import annotations

import json

import ase.build
import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.units import GPa

from potentials.calculator import PotentialCalculator
from potentials.cli.main import main
from potentials.properties import elastic_constants, equation_of_state, phonons
from potentials.properties.elastic import VOIGT, strain_matrix, strained
from potentials.properties.phonons import to_ase, to_phonopy_atoms

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def emt_elastic():
    return elastic_constants(ase.build.bulk("Cu", "fcc", a=3.6, cubic=True), EMT())


def _energy_second_derivatives(atoms: ase.Atoms, h: float = 1e-3) -> np.ndarray:
    """C_ij = (1/V) ∂²E/∂ε_i∂ε_j (GPa) by central differences of the energy (fcc: no internal relaxation)."""

    def energy(*pairs):
        eps = sum((strain_matrix(j, s) for j, s in pairs), np.zeros((3, 3)))
        a = strained(atoms, eps)
        a.calc = EMT()
        return a.get_potential_energy()

    c = np.empty((6, 6))
    for i in range(6):
        for j in range(6):
            c[i, j] = (energy((i, h), (j, h)) - energy((i, h), (j, -h)) - energy((i, -h), (j, h))
                       + energy((i, -h), (j, -h))) / (4 * h * h)
    return c / atoms.get_volume() / GPa


def test_elastic_constants_of_emt_copper(emt_elastic):
    c = emt_elastic.c
    relaxed = emt_elastic.atoms
    assert np.abs(emt_elastic.residual_stress).max() < 1e-3  # GPa: relaxed to zero stress first
    assert relaxed.cell.cellpar()[0] == pytest.approx(3.5898, abs=2e-4)  # EMT's lattice constant, not 3.6
    np.testing.assert_allclose(c, _energy_second_derivatives(relaxed), atol=0.5)
    # cubic symmetry: three independent constants, every other entry zero
    for group in ([(0, 0), (1, 1), (2, 2)], [(0, 1), (0, 2), (1, 2)], [(3, 3), (4, 4), (5, 5)]):
        values = [c[ij] for ij in group]
        assert max(values) - min(values) < 1e-6
    mask = np.zeros((6, 6), bool)
    mask[:3, :3] = True
    mask[3:, 3:] = np.eye(3, dtype=bool)
    assert np.abs(c[~mask]).max() < 1e-6
    assert c[0, 0] > c[0, 1] > 0 and c[3, 3] > 0 and emt_elastic.stable
    s = emt_elastic.summary()
    k = (c[0, 0] + 2 * c[0, 1]) / 3
    assert s["bulk_modulus_GPa"]["voigt"] == pytest.approx(k) and s["bulk_modulus_GPa"]["reuss"] == pytest.approx(k)
    g_v, g_r = (c[0, 0] - c[0, 1] + 3 * c[3, 3]) / 5, 5 * (c[0, 0] - c[0, 1]) * c[3, 3] / (
        4 * c[3, 3] + 3 * (c[0, 0] - c[0, 1]))
    assert s["shear_modulus_GPa"]["voigt"] == pytest.approx(g_v)
    assert s["shear_modulus_GPa"]["reuss"] == pytest.approx(g_r)
    assert s["shear_modulus_GPa"]["hill"] == pytest.approx((g_v + g_r) / 2)


def test_elastic_constants_in_the_conventional_axes(emt_elastic, tmp_path):
    # a CIF loses the orientation: the primitive fcc cell comes back with a along x, and C in that frame is not cubic
    ase.io.write(tmp_path / "cu.cif", ase.build.bulk("Cu", "fcc", a=3.6))
    turned = ase.io.read(tmp_path / "cu.cif")
    as_read = elastic_constants(turned, EMT()).c
    assert abs(as_read[0, 3]) > 10.0  # an xx-yz coupling no cubic crystal has in its own axes
    result = elastic_constants(turned, EMT(), standardize=True)
    assert len(result.atoms) == 4 and result.summary()["standardized"]
    np.testing.assert_allclose(result.c, emt_elastic.c, atol=1e-6)
    # the same crystal, either way: the bulk modulus does not depend on the frame (to the cell relaxation's tolerance)
    assert emt_elastic.summary()["bulk_modulus_GPa"]["voigt"] == pytest.approx(
        elastic_constants(turned, EMT()).summary()["bulk_modulus_GPa"]["voigt"], rel=1e-3)


def test_engineering_shear_and_unstable_tensor():
    eps = strain_matrix(3, 0.02)  # yz: γ = 0.02 is ε_yz = ε_zy = 0.01
    assert eps[1, 2] == eps[2, 1] == 0.01 and VOIGT[3] == (1, 2)
    from potentials.properties.elastic import ElasticResult

    c = np.diag([100.0, 100.0, 100.0, -5.0, 30.0, 30.0])
    result = ElasticResult(c, ase.build.bulk("Cu"), 0.005, False, False, np.zeros(6), np.zeros((0, 6)),
                           np.zeros((0, 6)))
    assert not result.stable and not result.summary()["born_stable"]


def test_eos_bulk_modulus_matches_elastic_constants(emt_elastic):
    c = emt_elastic.c
    result = equation_of_state(ase.build.bulk("Cu", "fcc", a=3.6), EMT(), volume_range=0.03, points=9)
    assert result.mode == "isotropic"
    s = result.summary()
    assert s["B0_GPa"] == pytest.approx((c[0, 0] + 2 * c[0, 1]) / 3, rel=0.01)
    assert s["V0"] == pytest.approx(emt_elastic.atoms.get_volume() / 4, rel=1e-4)  # primitive vs cubic cell
    assert 3.5 < s["B0_prime"] < 6 and s["rms_eV"] < 1e-5
    # hcp is not cubic: its shape relaxes at every volume, and the c/a it finds is EMT's
    hcp = equation_of_state(ase.build.bulk("Cu", "hcp", a=2.55, c=4.2), EMT(), volume_range=0.03, points=7)
    assert hcp.mode == "relaxed" and hcp.fit["B0_GPa"] == pytest.approx(s["B0_GPa"], rel=0.05)


def _phonopy_by_hand(atoms, calc, qpoints, supercell=(2, 2, 2)) -> np.ndarray:
    """phonopy's own workflow: symmetry-reduced ± displacements, forces from ``calc``, frequencies (THz)."""
    from phonopy import Phonopy

    ph = Phonopy(to_phonopy_atoms(atoms), supercell_matrix=np.diag(supercell), primitive_matrix="auto")
    ph.generate_displacements(distance=0.01, is_plusminus=True)
    forces = []
    for cell in ph.supercells_with_displacements:
        a = to_ase(cell)
        a.calc = calc
        forces.append(a.get_forces())
    ph.forces = forces
    ph.produce_force_constants()
    ph.run_qpoints(qpoints)
    return np.asarray(ph.qpoints.frequencies)


def test_emt_phonons_by_hessian_match_phonopy_displacements():
    atoms = ase.build.bulk("Cu", "fcc", a=3.59)
    result = phonons(atoms, EMT(), (2, 2, 2), method="hessian", mesh=(6, 6, 6), t_max=1000, t_step=500)
    assert result.method == "hessian" and result.imaginary_modes == 0
    qpoints = [p["q"] for p in result.special_points]
    expected = _phonopy_by_hand(atoms, EMT(), qpoints)
    got = np.array([p["frequencies_THz"] for p in result.special_points])
    np.testing.assert_allclose(got, expected, atol=0.01)
    labels = [p["label"] for p in result.special_points]
    assert set(labels) == {"G", "X", "W", "K", "L", "U"}
    x = got[labels.index("X")]
    assert np.abs(got[labels.index("G")]).max() < 1e-3 and 4.0 < x.max() < 9.0  # acoustic zero, THz scale
    heat = result.thermal["heat_capacity"]
    # 0 at 0 K; near Dulong-Petit (3R per atom) at 1000 K, less the three acoustic modes at Γ left out
    assert heat[0] == pytest.approx(0.0, abs=1e-6) and heat[-1] == pytest.approx(3 * 8.314462618, rel=0.02)


def test_model_phonons_hessian_and_displacements_agree(cu_model):
    calc = PotentialCalculator.from_file(cu_model, dtype="float64")
    atoms = ase.build.bulk("Cu", "fcc", a=3.6)
    kwargs = {"mesh": (4, 4, 4), "t_max": 100, "t_step": 50, "npoints": 11}
    by_hessian = phonons(atoms, calc, (2, 2, 2), method="hessian", **kwargs)
    by_displacements = phonons(atoms, calc, (2, 2, 2), method="displacements", **kwargs)
    assert by_hessian.n_evaluations == 3 and by_displacements.n_evaluations == 2  # rows; ± one displacement
    for a, b in zip(by_hessian.frequencies, by_displacements.frequencies, strict=True):
        np.testing.assert_allclose(a, b, atol=0.01)
    assert max(f.max() for f in by_hessian.frequencies) > 1.0  # a real spectrum, THz
    # the compact force constants of the Hessian path are the full ones phonopy builds, row for row
    full = by_displacements.phonopy.force_constants
    rows = by_hessian.phonopy.primitive.p2s_map
    np.testing.assert_allclose(by_hessian.phonopy.force_constants, full[rows], atol=5e-3)


def test_property_commands_write_json_and_figures(cu_model, tmp_path, capsys):
    structure = tmp_path / "cu.cif"
    ase.io.write(structure, ase.build.bulk("Cu", "fcc", a=3.6))

    out = tmp_path / "phonons"
    assert main(["phonons", str(cu_model), str(structure), "--supercell", "2", "2", "2", "--mesh", "4", "4", "4",
                 "--tmax", "200", "--tstep", "50", "--method", "hessian", "--relax", "--out", str(out)]) == 0
    record = json.loads((out / "phonons.json").read_text())
    assert {"imaginary_modes", "special_points", "band", "dos", "thermal", "method"} <= set(record)
    assert record["method"] == "hessian" and record["relaxed"] and record["atoms_in_supercell"] == 8
    assert len(record["band"]["frequencies_THz"][0][0]) == 3  # three branches per q-point
    assert record["thermal"]["temperature_K"] == [0.0, 50.0, 100.0, 150.0, 200.0]
    assert (out / "phonons.png").stat().st_size > 1000 and (out / "thermal.png").stat().st_size > 1000

    out = tmp_path / "elastic"
    assert main(["elastic", str(cu_model), str(structure), "--standardize", "--out", str(out)]) == 0
    record = json.loads((out / "elastic.json").read_text())
    assert np.array(record["C_GPa"]).shape == (6, 6) and record["voigt_order"] == ["xx", "yy", "zz", "yz", "xz", "xy"]
    for key in ("bulk_modulus_GPa", "shear_modulus_GPa"):
        assert set(record[key]) == {"voigt", "reuss", "hill"}
    assert record["relaxed_cell"] and "born_stable" in record and len(record["lattice_parameters"]) == 6
    c = np.array(record["C_GPa"])
    assert record["standardized"] and record["n_atoms"] == 4 and abs(c[0, 0] - c[1, 1]) < 1e-6 * abs(c[0, 0])
    assert (out / "elastic.png").stat().st_size > 1000

    out = tmp_path / "eos"
    assert main(["eos", str(cu_model), str(structure), "--points", "7", "--out", str(out)]) == 0
    record = json.loads((out / "eos.json").read_text())
    assert {"V0", "E0", "B0_GPa", "B0_prime", "mode"} <= set(record) and record["mode"] == "isotropic"
    assert len(record["volumes_A3"]) == 7 and (out / "eos.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Birch-Murnaghan" in printed and "Born stable" in printed and "imaginary modes" in printed


def test_property_commands_reject_molecules(cu_model, tmp_path):
    molecule = tmp_path / "cu2.xyz"
    ase.io.write(molecule, ase.Atoms("Cu2", positions=[[0, 0, 0], [2.4, 0, 0]]))
    for command in ("phonons", "elastic", "eos"):
        with pytest.raises(SystemExit, match="periodic in all three directions"):
            main([command, str(cu_model), str(molecule), "--out", str(tmp_path / command)])
