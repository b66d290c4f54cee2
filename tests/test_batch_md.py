"""Batched MD: the same trajectories as ASE one structure at a time (NVE, Langevin, Bussi, Nosé–Hoover chain),
per-structure seeds whatever else is in the batch, energy conservation, bad structures reported while the rest
run, uncertainty stops per structure, and the command line."""

from __future__ import annotations

import json

import ase
import ase.build
import ase.io
import numpy as np
import pytest
from ase.constraints import FixAtoms

from potentials import export
from potentials.batch_md import md_many
from potentials.calculator import PotentialCalculator
from potentials.cli.main import main
from potentials.errors import PotentialsInputError
from potentials.md import MDResult, run_md

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calc(cu_model) -> PotentialCalculator:
    return PotentialCalculator.from_file(cu_model, dtype="float64")


def _mixed() -> list[ase.Atoms]:
    """Periodic crystals of 2, 4 and 32 atoms (one with two atoms fixed) and a 5-atom cluster without a cell."""
    big = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    big.rattle(0.05, seed=3)
    small = ase.build.bulk("Cu", "fcc", a=3.58).repeat((2, 1, 1))
    cubic = ase.build.bulk("Cu", "fcc", a=3.65, cubic=True)
    cubic.set_constraint(FixAtoms(indices=[0, 2]))
    cluster = ase.Atoms("Cu5", positions=[[0, 0, 0], [2.4, 0.1, 0], [0.2, 2.6, 0], [1.1, 1.0, 2.2],
                                          [2.3, 2.4, 1.0]])
    return [big, small, cluster, cubic]


def _assert_same_run(one: MDResult, many: MDResult, atol: float = 1e-9) -> None:
    assert isinstance(many, MDResult)
    assert len(many.time_ps) == len(one.time_ps)
    np.testing.assert_allclose(many.atoms.positions, one.atoms.positions, rtol=0, atol=atol)
    np.testing.assert_allclose(many.atoms.get_momenta(), one.atoms.get_momenta(), rtol=0, atol=atol)
    for key in ("time_ps", "epot", "ekin", "temperature", "volume"):
        np.testing.assert_allclose(getattr(many, key), getattr(one, key), rtol=0, atol=1e-8, err_msg=key)


@pytest.mark.parametrize("ensemble,thermostat", [("nve", None), ("nvt", "langevin"), ("nvt", "bussi"),
                                                 ("nvt", "nose-hoover")])
def test_batched_runs_follow_the_one_by_one_ase_runs(calc, ensemble, thermostat):
    """20 steps of 2 fs at 600 K, three structures per model call (the fourth joins when one finishes)."""
    structures = _mixed()
    options = {"thermostat": thermostat} if thermostat else {}
    kwargs = {"ensemble": ensemble, "temperature_K": 600.0, "timestep_fs": 2.0, "steps": 20, **options}
    one = [run_md(a, calc, seed=7 + k, **kwargs) for k, a in enumerate(structures)]
    many = md_many(structures, calc.potential, seeds=[7 + k for k in range(4)], batch_size=3, **kwargs)
    for a, r1, r2 in zip(structures, one, many, strict=True):
        _assert_same_run(r1, r2)
        assert np.abs(r2.atoms.positions - a.positions).max() > 0.01  # the atoms did move
    fixed = structures[3].constraints[0].index
    assert np.array_equal(many[3].atoms.positions[fixed], structures[3].positions[fixed])


@pytest.mark.parametrize("thermostat", ["langevin", "bussi"])
def test_stochastic_runs_depend_on_their_seed_only(calc, thermostat):
    """A structure's Langevin or Bussi run is the same alone, in another batch, or in another place in the
    batch, as long as its seed is; another seed gives another run."""
    a, b, c, d = _mixed()
    kwargs = {"ensemble": "nvt", "thermostat": thermostat, "temperature_K": 500.0, "steps": 15}
    crowd = md_many([b, a, d, c], calc.potential, seeds=[1, 42, 3, 4], batch_size=4, **kwargs)
    alone = md_many([a], calc.potential, seeds=[42], batch_size=1, **kwargs)
    again = md_many([c, a], calc.potential, seeds=[9, 42], batch_size=2, max_atoms=40, **kwargs)
    other = md_many([a], calc.potential, seeds=[43], **kwargs)
    _assert_same_run(alone[0], crowd[1], atol=1e-10)
    _assert_same_run(alone[0], again[1], atol=1e-10)
    assert np.abs(other[0].atoms.positions - alone[0].atoms.positions).max() > 1e-4


def test_batched_nve_conserves_energy(calc):
    """200 steps of 1 fs at 300 K in float64: E_tot/N of each structure drifts by far less than 0.05 meV/atom/ps,
    while with 8 fs steps the error of the integrator shows."""
    structures = _mixed()
    results = md_many(structures, calc.potential, ensemble="nve", temperature_K=300.0, timestep_fs=1.0,
                      steps=200, batch_size=4)
    for r in results:
        assert abs(r.drift()) < 0.05, r.summary()
        assert r.summary()["etot_max_deviation_meV_per_atom"] < 0.1, r.summary()
        assert r.temperature.std() > 1.0  # energy did flow between kinetic and potential
    coarse = md_many(structures[:1], calc.potential, ensemble="nve", temperature_K=300.0, timestep_fs=8.0,
                     steps=25)[0]
    assert coarse.summary()["etot_max_deviation_meV_per_atom"] > 5 * results[0].summary()[
        "etot_max_deviation_meV_per_atom"]


def test_a_bad_structure_is_reported_and_the_others_run(calc, tmp_path):
    good = _mixed()
    unknown = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    unknown[0].symbol = "H"
    overlapping = ase.Atoms("Cu3", positions=[[0, 0, 0], [0.05, 0, 0], [2.5, 0, 0]])
    structures = [good[0], unknown, good[2], overlapping, good[1]]
    finished, advanced = [], []
    trajectories = [tmp_path / f"{k}.traj" for k in range(len(structures))]
    results = md_many(structures, calc.potential, steps=10, batch_size=2, trajectories=trajectories,
                      interval=5, on_done=lambda i, r: finished.append(i), on_step=advanced.append)
    assert sorted(finished) == list(range(5))
    assert sum(advanced) == 30 and max(advanced) == 2  # three structures of 10 steps, two per model call
    assert isinstance(results[1], PotentialsInputError) and "H" in str(results[1])
    assert isinstance(results[3], PotentialsInputError) and "0.05" in str(results[3])
    for k in (0, 2, 4):
        assert isinstance(results[k], MDResult) and len(results[k].time_ps) == 11
        assert len(ase.io.read(trajectories[k], ":")) == 3  # steps 0, 5, 10
    assert not trajectories[1].exists() and not trajectories[3].exists()
    with pytest.raises(ValueError, match="one structure at a time"):
        md_many(structures, calc.potential, ensemble="npt")
    with pytest.raises(ValueError, match="unknown thermostat"):
        md_many(structures, calc.potential, ensemble="nvt", thermostat="berendsen")


def test_uncertainty_is_watched_and_stops_each_structure_on_its_own(tmp_path):
    from potentials.uncertainty import EnsemblePotential
    from tests.tiny_model import MODEL_CONFIG, random_model

    members = [export.load(random_model(tmp_path / f"m{k}.pt", ["Cu"], seed=k)) for k in (0, 1)]
    path = export.save(EnsemblePotential(members), tmp_path / "committee.pt", MODEL_CONFIG)
    calc = PotentialCalculator.from_file(path, dtype="float64")
    structures = _mixed()[:3]
    kwargs = {"ensemble": "nve", "temperature_K": 300.0, "steps": 12}
    free = [run_md(a, calc, seed=k, **kwargs) for k, a in enumerate(structures)]
    peaks = [r.uncertainty["max_force_std_eV_per_A"] for r in free]
    threshold = (min(peaks) + max(peaks)) / 2  # the quietest structure runs to the end, the noisiest stops
    one = [run_md(a, calc, seed=k, max_uncertainty=threshold, stop_on_uncertainty=True, **kwargs)
           for k, a in enumerate(structures)]
    logs = [tmp_path / f"u{k}.log" for k in range(3)]
    many = md_many(structures, calc.potential, max_uncertainty=threshold, stop_on_uncertainty=True,
                   uncertainty_logs=logs, interval=4, batch_size=3, **kwargs)
    stops = [r.stopped_at_step for r in many]
    assert stops == [r.stopped_at_step for r in one]
    assert None in stops and any(s is not None for s in stops)
    for r1, r2, log in zip(one, many, logs, strict=True):
        _assert_same_run(r1, r2)
        assert r2.uncertainty["n_uncertain_steps"] == r1.uncertainty["n_uncertain_steps"]
        assert r2.uncertainty["max_force_std_eV_per_A"] == pytest.approx(r1.uncertainty["max_force_std_eV_per_A"])
        assert log.read_text().startswith("# step")
    plain = PotentialCalculator(members[0], dtype="float64").potential
    with pytest.raises(PotentialsInputError, match="uncertainty"):
        md_many(structures, plain, max_uncertainty=0.1)


def test_command_line_batched_equals_one_by_one(cu_model, tmp_path, capsys):
    structures = _mixed()
    ase.io.write(tmp_path / "crystals.extxyz", [structures[0], structures[1]])
    ase.io.write(tmp_path / "cluster.xyz", structures[2])
    bad = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    bad[1].symbol = "Zn"
    ase.io.write(tmp_path / "brass.cif", bad)
    inputs = [str(tmp_path / n) for n in ("crystals.extxyz", "cluster.xyz", "brass.cif")]
    common = ["--ensemble", "nvt", "--temperature", "400", "--steps", "20", "--interval", "5", "--seed", "3",
              "--no-progress"]
    code = main(["md", str(cu_model), *inputs, *common, "--batch-size", "2", "--max-atoms", "36",
                 "--out", str(tmp_path / "batched")])
    printed = capsys.readouterr()
    assert code == 1  # the brass cell: Zn is not in the model
    assert "error: structure brass" in printed.err and "Zn" in printed.err
    code = main(["md", str(cu_model), *inputs, *common, "--out", str(tmp_path / "single")])
    assert code == 1
    rows = json.loads((tmp_path / "batched" / "summary.json").read_text())
    assert [r["structure"] for r in rows] == ["crystals_0", "crystals_1", "cluster", "brass"]
    assert "error" in rows[3] and [r["seed"] for r in rows[:3]] == [3, 4, 5]
    for name in ("crystals_0", "crystals_1", "cluster"):
        batched, single = tmp_path / "batched" / name, tmp_path / "single" / name
        assert {p.name for p in batched.iterdir()} >= {"md.traj", "md.log", "md_energies.npz", "md_energies.png",
                                                        "md_summary.json"}
        frames, reference = ase.io.read(batched / "md.traj", ":"), ase.io.read(single / "md.traj", ":")
        assert len(frames) == len(reference) == 5
        for f1, f2 in zip(frames, reference, strict=True):
            np.testing.assert_allclose(f1.positions, f2.positions, rtol=0, atol=1e-9)
            assert f1.get_potential_energy() == pytest.approx(f2.get_potential_energy(), abs=1e-9)
        assert (batched / "md.log").read_text() == (single / "md.log").read_text()
        s1 = json.loads((batched / "md_summary.json").read_text())
        s2 = json.loads((single / "md_summary.json").read_text())
        assert s1["temperature_mean_K"] == pytest.approx(s2["temperature_mean_K"], abs=1e-6)
        assert s1["batch_size"] == 2 and s1["thermostat"] == "langevin"
    with pytest.raises(SystemExit, match="NPT"):
        main(["md", str(cu_model), *inputs, "--ensemble", "npt", "--batch-size", "4"])
    with pytest.raises(SystemExit, match="--index"):
        main(["md", str(cu_model), *inputs, "--index", "0", "--batch-size", "4"])
