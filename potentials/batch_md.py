"""Molecular dynamics of many independent structures at once: one model call per time step for a whole batch.

Each structure keeps its own state — positions, momenta, step count, random generator, records and output files —
and is integrated by the same update as ASE's integrator of :func:`potentials.md.run_md`, operation for operation:
velocity Verlet (NVE), and for NVT Langevin (``fixcm=False``), Bussi stochastic velocity rescaling and the
Nosé–Hoover chain. Velocities start from :func:`potentials.md.initialize_velocities` with the structure's own seed,
and the stochastic thermostats draw from ``numpy.random.default_rng(seed + 1)`` in ASE's order, so a batched run
follows the one-by-one run of the same structure and seed up to the rounding of the batched model call, whatever
else is in the batch. NPT, which moves each cell, runs one structure at a time.

Positions and momenta live on an :class:`ase.Atoms` per structure, so ``FixAtoms`` constraints act as they do in
ASE; after each model call the structure's results are put on it as a single-point calculator, which the trajectory
writer, :class:`ase.md.MDLogger` and :class:`potentials.uncertainty.UncertaintyWatch` read as in the one-by-one
path. Batches are filled in flight as in :mod:`potentials.batch_relax`: when a structure finishes (its steps done,
stopped on uncertainty, or rejected) the next waiting structures that fit join at the next step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import ase
import numpy as np
from ase import units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io.trajectory import Trajectory
from ase.stress import full_3x3_to_voigt_6_stress

from potentials.batching import BatchOutput, evaluate, first_fit, structure_graph
from potentials.errors import PotentialsInputError
from potentials.md import MDResult, initialize_velocities
from potentials.relax import check_structure

#: the thermostats the batched integrator implements (NPT runs one by one through ASE)
BATCH_THERMOSTATS = ("langevin", "bussi", "nose-hoover")


@dataclass
class _System:
    """One structure in flight."""

    index: int
    atoms: ase.Atoms  # positions and momenta; its calculator holds the results at the current positions
    dt: float  # ASE time units
    rng: np.random.Generator
    masses: np.ndarray  # [n, 1]
    nsteps: int = 0
    started: float = field(default_factory=time.perf_counter)
    record: dict[str, list[float]] = field(
        default_factory=lambda: {"time": [], "epot": [], "ekin": [], "temperature": [], "volume": []})
    coefficients: dict[str, Any] = field(default_factory=dict)
    trajectory: Trajectory | None = None
    logger: Any = None
    watch: Any = None
    results: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(potential=None, results={}))
    stopped: int | None = None

    def get_time(self) -> float:
        """Simulated time in ASE units (what :class:`ase.md.MDLogger` asks its dynamics for)."""
        return self.nsteps * self.dt

    def close(self) -> None:
        for f in (self.trajectory, self.logger, self.watch):
            if f is not None:
                f.close()


class _StepResults(SinglePointCalculator):
    """A structure's results at one geometry. Unlike :class:`SinglePointCalculator` it keeps only the positions to
    tell whether the atoms still stand where the results belong (numbers, cell and pbc do not change in a run), so
    that the integrator's and observers' reads do not compare whole structures several times per step."""

    def __init__(self, atoms: ase.Atoms, **results: Any) -> None:
        Calculator.__init__(self)
        self.results = results
        self._positions = atoms.positions.copy()

    def check_state(self, atoms: ase.Atoms, tol: float = 1e-15) -> list[str]:
        return [] if np.array_equal(atoms.positions, self._positions) else ["positions"]


def _langevin_coefficients(dt: float, temperature_K: float, friction: float, masses: np.ndarray) -> dict:
    """ASE Langevin's ``updatevars`` (Vanden-Eijnden & Ciccotti, Chem. Phys. Lett. 429, 310 (2006), eq. 23)."""
    fr, T = friction, units.kB * temperature_K
    sigma = np.sqrt(2 * T * fr / masses)
    c5 = dt**1.5 * sigma / (2 * np.sqrt(3))
    return {"c1": dt / 2.0 - dt * dt * fr / 8.0, "c2": dt * fr / 2 - dt * dt * fr * fr / 8.0,
            "c3": np.sqrt(dt) * sigma / 2.0 - dt**1.5 * fr * sigma / 8.0, "c4": fr / 2.0 * c5, "c5": c5}


def _bussi_alpha(system: _System, kinetic_energy: float) -> float:
    """The velocity scaling factor of Bussi et al., J. Chem. Phys. 126, 014101 (2007), eq. A7, drawn as ASE does."""
    c = system.coefficients
    scaling = (1 - c["exp"]) * c["target"] / kinetic_energy / c["ndof"]
    r1 = system.rng.standard_normal()
    rest = 2.0 * system.rng.standard_gamma(0.5 * (c["ndof"] - 1))
    return math.sqrt(c["exp"] + scaling * (rest + r1**2) + 2 * r1 * math.sqrt(c["exp"] * scaling))


def _first_half(system: _System, thermostat: str | None) -> None:
    """Everything of one step up to the new positions (the forces at the old ones are on ``system.atoms``)."""
    atoms, dt, masses = system.atoms, system.dt, system.masses
    if thermostat == "nose-hoover":  # ASE's NoseHooverChainNVT.step keeps its own q and p beside the atoms'
        c = system.coefficients
        c["p"] = c["chain"].integrate_nhc(c["p"], dt / 2)
        atoms.set_positions(c["q"])
        atoms.set_momenta(c["p"])
        c["p"] += dt / 2 * atoms.get_forces(md=True)
        c["q"] += dt * c["p"] / masses
        atoms.set_positions(c["q"])
        atoms.set_momenta(c["p"])
        return
    forces = atoms.get_forces(md=True)
    if thermostat == "langevin":
        c = system.coefficients
        v = atoms.get_velocities()
        xi = system.rng.standard_normal(size=(len(atoms), 3))
        eta = system.rng.standard_normal(size=(len(atoms), 3))
        c["rnd_pos"] = c["c5"] * eta
        c["rnd_vel"] = c["c3"] * xi - c["c4"] * eta
        v += c["c1"] * forces / masses - c["c2"] * v + c["rnd_vel"]
        x = atoms.get_positions()
        atoms.set_positions(x + dt * v + c["rnd_pos"])
        c["v"] = (atoms.get_positions() - x - c["rnd_pos"]) / dt
        return
    if thermostat == "bussi":
        kinetic = atoms.get_kinetic_energy()
        alpha = _bussi_alpha(system, kinetic)
        atoms.set_momenta(alpha * atoms.get_momenta())
    p = atoms.get_momenta()
    p += 0.5 * dt * forces
    r = atoms.get_positions()
    atoms.set_positions(r + dt * p / masses)
    if atoms.constraints:
        p = (atoms.get_positions() - r) * masses / dt
    atoms.set_momenta(p, apply_constraint=False)


def _second_half(system: _System, thermostat: str | None) -> None:
    """The rest of the step, with the forces at the new positions on ``system.atoms``."""
    atoms, dt = system.atoms, system.dt
    forces = atoms.get_forces(md=True)
    if thermostat == "nose-hoover":
        c = system.coefficients
        c["p"] += dt / 2 * forces
        c["p"] = c["chain"].integrate_nhc(c["p"], dt / 2)
        atoms.set_positions(c["q"])
        atoms.set_momenta(c["p"])
        return
    if thermostat == "langevin":
        c = system.coefficients
        v = c.pop("v")
        v += c["c1"] * forces / system.masses - c["c2"] * v + c["rnd_vel"]
        atoms.set_momenta(v * system.masses)
        return
    atoms.set_momenta(atoms.get_momenta() + 0.5 * dt * forces)


def _attach_results(system: _System, out: BatchOutput, b: int) -> None:
    """Structure ``b`` of the batch's model call as the single-point calculator of ``system.atoms``."""
    atoms = system.atoms
    part = out.atoms_of(b)
    energy = float(out.energy[b])
    results: dict[str, Any] = {"energy": energy, "free_energy": energy, "forces": out.forces[part]}
    if out.node_energy is not None:
        results["energies"] = out.node_energy[part]
    if out.stress is not None and np.all(atoms.pbc):
        results["stress"] = full_3x3_to_voigt_6_stress(out.stress[b])
    atoms.calc = _StepResults(atoms, **results)
    if out.forces_std is not None:
        system.results.results = {"forces_std": out.forces_std[part]}


def md_many(
    structures: Sequence[ase.Atoms],
    potential,
    *,
    ensemble: str = "nve",
    temperature_K: float = 300.0,
    timestep_fs: float = 1.0,
    steps: int = 1000,
    seeds: Sequence[int] | None = None,
    thermostat: str = "langevin",
    friction_per_fs: float = 0.01,
    tdamp_fs: float = 100.0,
    batch_size: int = 32,
    max_atoms: int | None = None,
    trajectories: Sequence[str | os.PathLike | None] | None = None,
    logfiles: Sequence[str | os.PathLike | None] | None = None,
    uncertainty_logs: Sequence[str | os.PathLike | None] | None = None,
    interval: int = 10,
    max_uncertainty: float | None = None,
    stop_on_uncertainty: bool = False,
    on_done: Callable[[int, MDResult | PotentialsInputError], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[MDResult | PotentialsInputError]:
    """Run MD on every structure, ``batch_size`` structures (at most ``max_atoms`` atoms) per model call.

    Arguments mean what they mean in :func:`potentials.md.run_md`, per structure: ``seeds[k]`` (default ``k``)
    seeds structure k's velocities and thermostat, ``trajectories[k]``, ``logfiles[k]`` and
    ``uncertainty_logs[k]`` are its ``md.traj``, ``md.log`` and ``md_uncertainty.log`` (or None). ``potential``
    is the model on its device and dtype (``PotentialCalculator(...).potential``); ``ensemble`` is ``nve`` or
    ``nvt`` with ``thermostat`` ``langevin`` (``friction_per_fs``), ``bussi`` or ``nose-hoover`` (``tdamp_fs``).
    ``on_done(index, result)`` is called as each structure finishes, ``on_step(n)`` after each model call with the
    number of structures that completed a step in it (for a progress bar).

    Returns:
        Per structure, in input order, an :class:`~potentials.md.MDResult` (``wall_time_s``: the time the structure
        spent in flight, shared with the rest of its batch) or the
        :class:`~potentials.errors.PotentialsInputError` that rejected it (an element the model never saw,
        overlapping atoms, a constraint other than ``FixAtoms``, non-finite forces during the run); the others run
        regardless.

    Raises:
        PotentialsInputError: ``max_uncertainty`` or ``stop_on_uncertainty`` for a model without uncertainty.
        ValueError: NPT (the batched integrator keeps each cell fixed), an unknown thermostat, or a bad batch size.
    """
    from potentials.uncertainty import UncertaintyExceeded, UncertaintyWatch

    if ensemble not in ("nve", "nvt"):
        raise ValueError(f"batched MD integrates NVE and NVT; {ensemble!r} runs one structure at a time")
    if ensemble == "nvt" and thermostat not in BATCH_THERMOSTATS:
        raise ValueError(f"unknown thermostat {thermostat!r}; choose one of {', '.join(BATCH_THERMOSTATS)}")
    if batch_size < 1 or (max_atoms is not None and max_atoms < 1):
        raise ValueError("batch_size and max_atoms must be positive")
    UncertaintyWatch(None, SimpleNamespace(potential=potential), threshold=max_uncertainty,
                     stop=stop_on_uncertainty)  # refuses the options for a model without uncertainty
    thermo = thermostat if ensemble == "nvt" else None
    dtype = next(iter(potential.buffers())).dtype
    dt = timestep_fs * units.fs
    interval = max(int(interval), 1)
    seeds = list(seeds) if seeds is not None else list(range(len(structures)))
    results: list[MDResult | PotentialsInputError | None] = [None] * len(structures)
    limit = max_atoms if max_atoms is not None else float("inf")

    def pick(paths, index):
        return paths[index] if paths is not None else None

    def finish(job: _System | int, result: MDResult | PotentialsInputError) -> None:
        index = job if isinstance(job, int) else job.index
        if isinstance(job, _System):
            job.close()
        results[index] = result
        if on_done is not None:
            on_done(index, result)

    def start(index: int) -> _System | None:
        source = structures[index]
        try:
            check_structure(source, potential)
            if any(not isinstance(c, FixAtoms) for c in source.constraints):
                raise PotentialsInputError("batched MD supports FixAtoms constraints only; run this structure "
                                           "without --batch-size")
            atoms = source.copy()
            atoms.calc = None
            initialize_velocities(atoms, temperature_K, seeds[index])
            system = _System(index, atoms, dt, np.random.default_rng(seeds[index] + 1),
                             atoms.get_masses()[:, None])
            if thermo == "langevin":
                system.coefficients = _langevin_coefficients(dt, temperature_K, friction_per_fs / units.fs,
                                                             system.masses)
            elif thermo == "nose-hoover":
                from ase.md.nose_hoover_chain import NoseHooverChainThermostat

                chain = NoseHooverChainThermostat(num_atoms_global=len(atoms), masses=system.masses,
                                                  temperature_K=temperature_K, tdamp=tdamp_fs * units.fs)
                system.coefficients = {"chain": chain, "q": atoms.get_positions(), "p": atoms.get_momenta()}
            elif thermo == "bussi":
                if np.isclose(atoms.get_kinetic_energy(), 0.0, rtol=0, atol=1e-12):
                    raise PotentialsInputError("Bussi rescaling needs a non-zero initial kinetic energy (a "
                                               "temperature above 0 K)")
                ndof = atoms.get_number_of_degrees_of_freedom()
                system.coefficients = {"ndof": ndof, "target": 0.5 * temperature_K * units.kB * ndof,
                                       "exp": math.exp(-dt / (tdamp_fs * units.fs))}
            system.results.potential = potential
            system.watch = UncertaintyWatch(atoms, system.results, log=pick(uncertainty_logs, index),
                                            interval=interval, threshold=max_uncertainty, stop=stop_on_uncertainty)
        except ValueError as err:
            finish(index, err if isinstance(err, PotentialsInputError) else PotentialsInputError(str(err)))
            return None
        path = pick(trajectories, index)
        if path is not None:
            system.trajectory = Trajectory(str(path), "w", atoms)
        log = pick(logfiles, index)
        if log is not None:
            from ase.md import MDLogger

            system.logger = MDLogger(system, atoms, str(log), header=True, stress=bool(np.all(atoms.pbc)),
                                     peratom=True, mode="w")
        return system

    def observe(system: _System) -> bool:
        """The observers of ``run_md`` in its order; False when the uncertainty watch stops the run."""
        atoms, rec = system.atoms, system.record
        rec["time"].append(system.get_time() / (1000 * units.fs))
        rec["epot"].append(atoms.get_potential_energy())
        rec["ekin"].append(atoms.get_kinetic_energy())
        rec["temperature"].append(atoms.get_temperature())
        rec["volume"].append(atoms.get_volume() if np.all(atoms.pbc) else 0.0)
        try:
            system.watch()
        except UncertaintyExceeded as exceeded:
            system.stopped = exceeded.step
            if system.trajectory is not None:
                system.trajectory.write()
            return False
        if system.nsteps % interval == 0:
            if system.trajectory is not None:
                system.trajectory.write()
            if system.logger is not None:
                system.logger()
        return True

    def result_of(system: _System) -> MDResult:
        arrays = {k: np.asarray(v, dtype=float) for k, v in system.record.items()}
        final = system.atoms.copy()
        final.calc = system.atoms.calc
        return MDResult(arrays["time"], arrays["epot"], arrays["ekin"], arrays["temperature"], arrays["volume"],
                        len(final), time.perf_counter() - system.started, final, system.watch.summary(),
                        system.stopped)

    pending = list(range(len(structures)))
    sizes = [len(a) for a in structures]
    active: list[_System] = []
    while pending or active:
        while admitted := first_fit(pending, sizes, len(active), sum(len(s.atoms) for s in active), batch_size,
                                    limit):
            taken = set(admitted)
            pending = [i for i in pending if i not in taken]
            started = [s for s in map(start, admitted) if s is not None]
            active += started
            if len(started) == len(admitted):
                break  # else rejected structures left room for more
        graphs, kept = [], []
        for system in active:  # every system waits for the forces at its current positions
            try:
                graphs.append(structure_graph(system.atoms.positions, system.atoms.cell.array, system.atoms,
                                              potential.cutoff, dtype))
            except ValueError as err:
                finish(system, PotentialsInputError(f"step {system.nsteps}: {err}"))
                continue
            kept.append(system)
        active = kept
        if not active:
            continue
        out = evaluate(potential, graphs, stress=any(bool(np.all(s.atoms.pbc)) for s in active))
        still = []
        advanced = 0
        for b, system in enumerate(active):
            if not (np.isfinite(out.energy[b]) and np.isfinite(out.forces[out.atoms_of(b)]).all()):
                finish(system, PotentialsInputError(f"non-finite energy or forces at step {system.nsteps}"))
                continue
            _attach_results(system, out, b)
            if system.record["time"]:  # else this was the force call of step 0
                _second_half(system, thermo)
                system.nsteps += 1
                advanced += 1
            if not observe(system) or system.nsteps >= steps:
                finish(system, result_of(system))
                continue
            _first_half(system, thermo)
            still.append(system)
        active = still
        if on_step is not None:
            on_step(advanced)
    return results  # type: ignore[return-value]
