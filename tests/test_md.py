"""`potentials md`: energy conservation in NVE, what breaks it, thermostats and barostats, and the outputs."""

from __future__ import annotations

import json

import ase.build
import ase.io
import numpy as np
import pytest

from potentials.calculator import PotentialCalculator
from potentials.cli.main import main
from potentials.md import energy_drift, run_md

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cu32():
    return ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)


class _ForcesFlipped(PotentialCalculator):
    """Returns +∇E instead of −∇E: the forces no longer belong to the energy."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or [])
        self.results["forces"] = -self.results["forces"]


def test_energy_drift_is_the_slope_per_atom_per_ps():
    t = np.linspace(0, 2, 50)
    assert energy_drift(t, -3.0 + 0.004 * t) == pytest.approx(4.0)  # 4 meV/atom/ps


def test_nve_conserves_energy_from_the_command_line(cu_model, cu32, tmp_path, capsys):
    """200 steps of 1 fs at 300 K in float64: E_tot/N drifts by far less than 0.05 meV/atom/ps."""
    structure = tmp_path / "cu.cif"
    ase.io.write(structure, cu32)
    out = tmp_path / "md"
    code = main(["md", str(cu_model), str(structure), "--ensemble", "nve", "--temperature", "300", "--timestep", "1",
                 "--steps", "200", "--dtype", "float64", "--out", str(out), "--seed", "1", "--interval", "20"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "E_tot drift" in printed and "meV/atom/ps" in printed
    summary = json.loads((out / "md_summary.json").read_text())
    assert summary["steps"] == 200 and summary["n_atoms"] == 32 and summary["simulated_time_ps"] == pytest.approx(0.2)
    assert abs(summary["etot_drift_meV_per_atom_per_ps"]) < 0.05, summary
    assert summary["etot_max_deviation_meV_per_atom"] < 0.05, summary
    assert 50 < summary["temperature_mean_K"] < 300  # equipartition takes about half the initial kinetic energy
    frames = ase.io.read(out / "md.traj", ":")
    assert len(frames) == 11 and np.abs(frames[-1].positions - frames[0].positions).max() > 0.01
    log = (out / "md.log").read_text().splitlines()
    assert log[0].split()[:2] == ["Time[ps]", "Etot/N[eV]"] and len(log) == 12
    energies = np.load(out / "md_energies.npz")
    assert energies["time_ps"].shape == (201,)
    assert (out / "md_energies.png").stat().st_size > 5000


def test_conservation_needs_forces_that_are_minus_the_energy_gradient(cu_model, cu32):
    """Correct forces conserve E_tot to second order in the timestep; flipping their sign breaks it outright."""
    calc = PotentialCalculator.from_file(cu_model, dtype="float64")
    good = run_md(cu32, calc, ensemble="nve", temperature_K=300, timestep_fs=1.0, steps=200, seed=2)
    coarse = run_md(cu32, calc, ensemble="nve", temperature_K=300, timestep_fs=4.0, steps=50, seed=2)
    flipped = run_md(cu32, _ForcesFlipped(calc.potential, dtype="float64"), ensemble="nve", temperature_K=300,
                     timestep_fs=1.0, steps=200, seed=2)

    def spread(result):  # fluctuation of E_tot/N, meV/atom
        return float(np.std(result.etot / result.n_atoms) * 1e3)

    # velocity Verlet's energy error scales as dt²: 4× the step → about 16× the fluctuation
    assert 8 < spread(coarse) / spread(good) < 32, (spread(good), spread(coarse))
    assert spread(flipped) > 1000 * spread(good), (spread(good), spread(flipped))
    assert abs(flipped.drift()) > 100 * max(abs(good.drift()), 1e-3)


def test_nvt_thermostats_and_npt_barostat(cu_model, cu32):
    """Langevin and Bussi pull a cold start towards the target; isotropic MTK NPT changes the volume."""
    calc = PotentialCalculator.from_file(cu_model, dtype="float64")
    for thermostat in ("langevin", "bussi"):
        result = run_md(cu32, calc, ensemble="nvt", temperature_K=600, timestep_fs=2.0, steps=60, seed=3,
                        thermostat=thermostat, friction_per_fs=0.05, tdamp_fs=20.0)
        nve = run_md(cu32, calc, ensemble="nve", temperature_K=600, timestep_fs=2.0, steps=60, seed=3)
        # without a bath about half the kinetic energy goes into the potential energy; a strong bath refills it
        assert result.temperature[-20:].mean() > 1.3 * nve.temperature[-20:].mean(), thermostat
    npt = run_md(cu32, calc, ensemble="npt", temperature_K=300, timestep_fs=2.0, steps=40, seed=3, barostat="mtk",
                 pressure_GPa=5.0, pdamp_fs=100.0)
    assert npt.volume[-1] < npt.volume[0] - 0.1  # 5 GPa compresses the cell
    assert np.allclose(npt.atoms.cell.angles(), 90.0)  # isotropic: the cell keeps its shape


def test_npt_refuses_a_molecule(cu_model, tmp_path, capsys):
    molecule = ase.Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0]])
    structure = tmp_path / "cu3.xyz"
    ase.io.write(structure, molecule)
    with pytest.raises(SystemExit, match="NPT .* periodic in all three directions"):
        main(["md", str(cu_model), str(structure), "--ensemble", "npt", "--steps", "5", "--out", str(tmp_path / "md")])
