"""Molecular dynamics with ASE integrators: NVE (velocity Verlet), NVT (Langevin, Bussi, Nosé–Hoover chain) and
NPT (isotropic or full-cell MTK with Nosé–Hoover chains, or Berendsen), with energies recorded every step.

Units at this interface: time in fs (timestep, coupling times) or ps (results), temperature K, pressure GPa,
compressibility 1/GPa, energies eV. The NVE total-energy drift is the slope of a least-squares line through
E_tot/N against time, in meV/atom/ps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase
import numpy as np
from ase import units

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "bussi", "nose-hoover")
BAROSTATS = ("mtk", "mtk-full", "berendsen")


@dataclass
class MDResult:
    """Per-step record of a run (S = steps + 1 entries, the initial state included).

    Attributes:
        time_ps: [S] ps.
        epot, ekin: [S] potential and kinetic energy of the whole system, eV.
        temperature: [S] instantaneous temperature, K.
        volume: [S] cell volume, Å³ (0 when not periodic).
        n_atoms: number of atoms.
        wall_time_s: wall-clock time of the integration, s.
        atoms: the final structure.
        uncertainty: for a model with uncertainty, the maximum per-atom force std over the run and the steps above
            the threshold (:meth:`potentials.uncertainty.UncertaintyWatch.summary`); empty otherwise.
        stopped_at_step: the step where ``stop_on_uncertainty`` ended the run, or None.
    """

    time_ps: np.ndarray
    epot: np.ndarray
    ekin: np.ndarray
    temperature: np.ndarray
    volume: np.ndarray
    n_atoms: int
    wall_time_s: float
    atoms: ase.Atoms
    uncertainty: dict[str, Any] = field(default_factory=dict)
    stopped_at_step: int | None = None

    @property
    def etot(self) -> np.ndarray:
        """[S] total energy, eV."""
        return self.epot + self.ekin

    def drift(self) -> float:
        """Slope of E_tot/N against time, meV/atom/ps (the NVE energy drift)."""
        return energy_drift(self.time_ps, self.etot / self.n_atoms)

    def summary(self) -> dict[str, Any]:
        """Averages over the second half of the run, the drift and fluctuation of E_tot/N and the speed."""
        half = slice(len(self.time_ps) // 2, None)
        e = self.etot / self.n_atoms * 1e3
        steps = len(self.time_ps) - 1
        ns_per_day = float(self.time_ps[-1] * 1e-3 / self.wall_time_s * 86400) if self.wall_time_s > 0 else None
        out = {
            "n_atoms": self.n_atoms, "steps": steps, "simulated_time_ps": float(self.time_ps[-1]),
            "temperature_mean_K": float(self.temperature[half].mean()),
            "temperature_std_K": float(self.temperature[half].std()),
            "epot_mean_eV_per_atom": float(self.epot[half].mean() / self.n_atoms),
            "etot_drift_meV_per_atom_per_ps": self.drift(),
            "etot_std_meV_per_atom": float(e.std()),
            "etot_max_deviation_meV_per_atom": float(np.abs(e - e[0]).max()),
            "wall_time_s": self.wall_time_s, "steps_per_s": steps / self.wall_time_s if self.wall_time_s else None,
            "ns_per_day": ns_per_day,
        }
        if self.volume[0] > 0:
            out["volume_mean_A3"] = float(self.volume[half].mean())
            out["volume_change_percent"] = float((self.volume[-1] / self.volume[0] - 1) * 100)
        if self.uncertainty:
            out["uncertainty"] = {**self.uncertainty, "stopped_at_step": self.stopped_at_step}
        return out


def energy_drift(time_ps: np.ndarray, energy_per_atom_eV: np.ndarray) -> float:
    """Least-squares slope of ``energy_per_atom_eV`` [S] (eV/atom) against ``time_ps`` [S], in meV/atom/ps."""
    if len(time_ps) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(time_ps, float), np.asarray(energy_per_atom_eV, float) * 1e3, 1)[0])


def make_dynamics(atoms: ase.Atoms, ensemble: str, *, timestep_fs: float, temperature_K: float,
                  thermostat: str = "langevin", barostat: str = "mtk", pressure_GPa: float = 0.0,
                  friction_per_fs: float = 0.01, tdamp_fs: float = 100.0, pdamp_fs: float = 1000.0,
                  compressibility_per_GPa: float = 0.01, seed: int = 0):
    """The ASE dynamics object for ``ensemble`` (atoms must carry a calculator).

    Args:
        atoms: the system, with velocities already set.
        ensemble: ``nve``, ``nvt`` or ``npt`` (NPT needs a cell periodic in all three directions).
        timestep_fs: integration step, fs.
        temperature_K: thermostat target, K.
        thermostat: NVT thermostat: ``langevin`` (friction ``friction_per_fs``), ``bussi`` (stochastic velocity
            rescaling, time constant ``tdamp_fs``) or ``nose-hoover`` (chain, ``tdamp_fs``).
        barostat: NPT scheme: ``mtk`` (isotropic MTK with Nosé–Hoover chains), ``mtk-full`` (MTK, every cell degree
            of freedom) or ``berendsen`` (isotropic weak coupling; ``compressibility_per_GPa``).
        pressure_GPa: NPT target pressure, GPa.
        tdamp_fs, pdamp_fs: thermostat and barostat time constants, fs.
        seed: seed of the stochastic thermostats.
    """
    from ase.md.verlet import VelocityVerlet

    dt = timestep_fs * units.fs
    rng = np.random.default_rng(seed + 1)
    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt":
        if thermostat == "langevin":
            from ase.md.langevin import Langevin

            return Langevin(atoms, dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
                            fixcm=False, rng=rng)
        if thermostat == "bussi":
            from ase.md.bussi import Bussi

            return Bussi(atoms, dt, temperature_K=temperature_K, taut=tdamp_fs * units.fs, rng=rng)
        if thermostat == "nose-hoover":
            from ase.md.nose_hoover_chain import NoseHooverChainNVT

            return NoseHooverChainNVT(atoms, dt, temperature_K=temperature_K, tdamp=tdamp_fs * units.fs)
        raise ValueError(f"unknown thermostat {thermostat!r}; choose one of {', '.join(THERMOSTATS)}")
    if ensemble == "npt":
        if not np.all(atoms.pbc):
            raise ValueError(f"NPT changes the cell and needs a structure periodic in all three directions; this "
                             f"one has pbc={atoms.pbc.tolist()}. Use --ensemble nvt or nve for molecules and slabs")
        if abs(atoms.get_volume()) < 1e-6:
            raise ValueError("NPT needs a cell with non-zero volume")
        pressure = pressure_GPa * units.GPa
        if barostat in ("mtk", "mtk-full"):
            if atoms.constraints:
                raise ValueError("the MTK barostat does not support constraints (FixAtoms, ...); remove them or use "
                                 "--barostat berendsen")
            from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

            cls = IsotropicMTKNPT if barostat == "mtk" else MTKNPT
            return cls(atoms, dt, temperature_K=temperature_K, pressure_au=pressure, tdamp=tdamp_fs * units.fs,
                       pdamp=pdamp_fs * units.fs)
        if barostat == "berendsen":
            from ase.md.nptberendsen import NPTBerendsen

            return NPTBerendsen(atoms, dt, temperature_K=temperature_K, pressure_au=pressure,
                                taut=tdamp_fs * units.fs, taup=pdamp_fs * units.fs,
                                compressibility_au=compressibility_per_GPa / units.GPa)
        raise ValueError(f"unknown barostat {barostat!r}; choose one of {', '.join(BAROSTATS)}")
    raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")


def initialize_velocities(atoms: ase.Atoms, temperature_K: float, seed: int = 0) -> None:
    """Maxwell–Boltzmann velocities at ``temperature_K``, zero total momentum (and zero angular momentum when the
    structure is not periodic)."""
    from ase.md import velocitydistribution as vd

    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    vd.Stationary(atoms)
    if not atoms.pbc.any() and len(atoms) > 2:
        vd.ZeroRotation(atoms)


def run_md(atoms: ase.Atoms, calc, *, ensemble: str = "nve", temperature_K: float = 300.0, timestep_fs: float = 1.0,
           steps: int = 1000, seed: int = 0, trajectory: str | os.PathLike | None = None,
           logfile: str | os.PathLike | None = None, interval: int = 10, progress: bool = False,
           max_uncertainty: float | None = None, stop_on_uncertainty: bool = False,
           uncertainty_log: str | os.PathLike | None = None, **dynamics_options: Any) -> MDResult:
    """Run MD on a copy of ``atoms`` from Maxwell–Boltzmann velocities at ``temperature_K``.

    Args:
        atoms: the starting structure (not modified).
        calc: ASE calculator.
        ensemble: ``nve``, ``nvt`` or ``npt`` (see :func:`make_dynamics` for ``dynamics_options``).
        temperature_K: initial (and, for NVT/NPT, target) temperature, K.
        timestep_fs: integration step, fs.
        steps: number of steps.
        seed: seed of the initial velocities (and, plus one, of stochastic thermostats).
        trajectory: ASE ``.traj`` file written every ``interval`` steps.
        logfile: ``ase.md.MDLogger`` log written every ``interval`` steps (per-atom energies, T; stress if periodic).
        interval: steps between trajectory frames and log lines.
        progress: show a tqdm progress bar.
        max_uncertainty: eV/Å; steps whose maximum per-atom force std is above it are flagged in
            ``uncertainty_log`` and in the trajectory frames' ``info`` (``uncertain``); needs a model with
            uncertainty.  For such a model, ``uncertainty_log`` gets the maximum force std every ``interval`` steps.
        stop_on_uncertainty: end the run at the first flagged step (that frame is written to the trajectory).
    """
    from ase.io import Trajectory
    from ase.md import MDLogger
    from tqdm import tqdm

    atoms = atoms.copy()
    atoms.calc = calc
    initialize_velocities(atoms, temperature_K, seed)
    dyn = make_dynamics(atoms, ensemble, timestep_fs=timestep_fs, temperature_K=temperature_K, seed=seed,
                        **dynamics_options)
    periodic = bool(np.all(atoms.pbc))
    record: dict[str, list[float]] = {"time": [], "epot": [], "ekin": [], "temperature": [], "volume": []}
    bar = tqdm(total=steps, unit="step", desc=f"MD {ensemble}", disable=not progress, mininterval=0.5)

    def observe() -> None:
        record["time"].append(dyn.get_time() / (1000 * units.fs))
        record["epot"].append(atoms.get_potential_energy())
        record["ekin"].append(atoms.get_kinetic_energy())
        record["temperature"].append(atoms.get_temperature())
        record["volume"].append(atoms.get_volume() if periodic else 0.0)
        bar.update(dyn.nsteps - bar.n)
        if dyn.nsteps % max(interval, 1) == 0:
            bar.set_postfix_str(f"T={record['temperature'][-1]:.0f} K, "
                                f"E_tot/N={(record['epot'][-1] + record['ekin'][-1]) / len(atoms):.4f} eV")

    dyn.attach(observe, interval=1)
    from potentials.uncertainty import UncertaintyExceeded, UncertaintyWatch

    watch = UncertaintyWatch(atoms, calc, log=uncertainty_log, interval=interval, threshold=max_uncertainty,
                             stop=stop_on_uncertainty)
    dyn.attach(watch, interval=1)  # before the trajectory: its frames carry the flag
    files = []
    traj = None
    if trajectory is not None:
        traj = Trajectory(str(trajectory), "w", atoms)
        files.append(traj)
        dyn.attach(traj.write, interval=interval)
    if logfile is not None:
        logger = MDLogger(dyn, atoms, str(logfile), header=True, stress=periodic, peratom=True, mode="w")
        files.append(logger)
        dyn.attach(logger, interval=interval)
    start = time.perf_counter()
    stopped = None
    try:
        dyn.run(steps)
    except UncertaintyExceeded as exceeded:
        stopped = exceeded.step
        if traj is not None:
            traj.write()  # the frame that stopped the run (the watch runs before the trajectory writer)
    finally:
        watch.close()
        wall = time.perf_counter() - start
        bar.close()
        for f in files:
            f.close()
    arrays = {k: np.asarray(v, dtype=float) for k, v in record.items()}
    return MDResult(arrays["time"], arrays["epot"], arrays["ekin"], arrays["temperature"], arrays["volume"],
                    len(atoms), wall, atoms, watch.summary(), stopped)


def write_outputs(result: MDResult, out_dir: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Path]:
    """``md_summary.json`` (settings and :meth:`MDResult.summary`), ``md_energies.npz`` (per-step record) and the
    ``md_energies.png`` figure in ``out_dir``."""
    import json

    from potentials import plots

    out = Path(out_dir)
    summary = {**settings, **result.summary()}
    if settings.get("ensemble") != "nve":
        summary.pop("etot_drift_meV_per_atom_per_ps")  # not conserved under a thermostat
    files = {"summary": out / "md_summary.json", "energies": out / "md_energies.npz",
             "figure": out / "md_energies.png"}
    np.savez_compressed(files["energies"], time_ps=result.time_ps, epot_eV=result.epot, ekin_eV=result.ekin,
                        temperature_K=result.temperature, volume_A3=result.volume)
    drift = summary.get("etot_drift_meV_per_atom_per_ps")
    fig = plots.md_energies(result.time_ps, result.etot, result.epot, result.temperature, result.n_atoms,
                            target_K=settings.get("temperature_K") if settings.get("ensemble") != "nve" else None,
                            drift=drift, title=f"{settings.get('formula', '')} {settings.get('ensemble', '').upper()}")
    plots.save(fig, files["figure"])
    files["summary"].write_text(json.dumps(summary, indent=2))
    return files
