"""One deployable file per trained model: ``save(potential, path, model_config)`` and ``load(path)``.

The file is a ``torch.save`` of plain data (loadable with ``weights_only=True``, no pickled classes), in named
sections (format 3)::

    {"format_version": 3, "package_version": "0.1.0", "units": {"energy": "eV", ...},
     "model":     {"config": <Hydra config, _target_ names the class>, "state": <state_dict>},
     "potential": {"cutoff": Å, "atomic_energies": {z: eV}, "scale": float, "shift": eV, "elements": [z, ...]},
     "runtime":   {"kernels": "auto", "compile": false},
     "physics":   {"zbl": false, "dispersion": null | "d3bj", "functional": "pbe", ...},
     "training":  {<provenance of the run: data set, test metrics>},
     "ensemble":  {"kind": "committee" | "shallow", "size": N, "calibration": {"energy": s, "forces": s},
                   "members": [{"model": ..., "potential": ..., "runtime": ..., "physics": ...}, ...]}}

``physics`` (:class:`potentials.physics.PhysicsConfig`) names the terms added to the network energy; no section
means none.  A file with a term switched on is written as format 4, so that a format-3 reader, which would drop
the term, refuses it; a file without physics terms stays format 3.

``ensemble`` (:mod:`potentials.uncertainty`) makes the file a model with uncertainty; no section means a single
model.  A committee's first member is the file's ``model``/``potential``/``runtime``/``physics`` sections and the
others are in ``ensemble.members`` in the same sections; a shallow ensemble's ``model.state`` holds the backbone and
its ``size`` readout heads.  A file with an ensemble is written as format 5, so that an older reader refuses it.

``model.config`` holds what the model resolved from its defaults (``EnergyModel.resolved_config``, e.g.
EquiformerV2's grids) and the weights are the EMA weights when training used EMA.

The one rule: **a missing section or key means the behaviour of the version that wrote the file.**  A reader
therefore takes, for every section and key it reads, the default that reproduces files written without it: no
``runtime`` section means ``kernels="auto"`` and ``compile=False``; formats 1 and 2 (flat keys ``model_config``,
``model_state``, ``cutoff``, …, ``extra``) are read into the same sections; and the model class upgrades the config
of an older file itself (``EnergyModel.upgrade_config``, e.g. EquiformerV2's format-1 grids).  Keys that every
version wrote (the model config and weights, cutoff, reference energies, scale, shift) are required.

Sections the reader does not know are not an error: they are kept, as written, in ``potential.metadata`` under
their name.  To add a section (e.g. ``"lineage"`` for fine-tuning, ``"physics"`` for ZBL/D3, ``"ensemble"``):

1. write it in :func:`save` as plain data under a new top-level name (or pass it through ``sections=``);
2. read it in :func:`load` with the default that stands for its absence (the rule above), e.g. no ``physics``
   section means no added physics terms;
3. raise :data:`FORMAT_VERSION` when a reader that ignores the section would compute something else (a section that
   changes energies or forces); the older reader then refuses the file with an "upgrade potentials" message instead
   of silently dropping the term.  A section that is only information (provenance, lineage) needs no new version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from potentials.errors import PotentialsInputError
from potentials.models.base import EnergyModel
from potentials.potential import KERNELS, Potential

if TYPE_CHECKING:
    from potentials.uncertainty import EnsemblePotential

#: 1: flat keys.  2: model_config holds what a model resolved from its defaults (``resolved_config()``).
#: 3: named sections (module docstring), ``runtime.kernels``.  4: a ``physics`` section with a term switched on.
#: 5: an ``ensemble`` section (committee or shallow ensemble).
FORMAT_VERSION = 5
UNITS = {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å³ (ASE sign)"}
#: the top-level names this version writes and reads; any other is kept in ``Potential.metadata``
SECTIONS = ("format_version", "package_version", "units", "model", "potential", "runtime", "physics", "training",
            "ensemble")


def _package_version() -> str:
    from potentials import __version__

    return __version__


def save(potential: Potential, path: str | os.PathLike, model_config: dict[str, Any],
         extra: dict[str, Any] | None = None, sections: dict[str, Any] | None = None) -> Path:
    """Write ``potential`` to ``path`` (atomically: a temporary file renamed into place).

    Args:
        potential: the potential to export (its model, reference energies, scale/shift, ``kernels`` and
            ``physics``).
        path: the file to write.
        model_config: the model's Hydra config (``_target_`` names the class); what the model resolved from its
            defaults is written over it.
        extra: provenance of the run (plain data), written as the ``training`` section.
        sections: further top-level sections (plain data), by name; a name this version writes itself is refused.
    """
    from potentials.uncertainty import EnsemblePotential

    clash = sorted(set(sections or {}) & set(SECTIONS))
    if clash:
        raise ValueError(f"sections {clash} are written by save() itself")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ensemble = None
    if isinstance(potential, EnsemblePotential):
        ensemble = {"kind": potential.kind, "size": potential.size, "calibration": dict(potential.calibration),
                    "members": [_potential_sections(m, model_config) for m in potential.members[1:]]}
        potential = potential.members[0]
    version = FORMAT_VERSION if ensemble else 4 if potential.physics.any else 3  # the oldest that reads it all
    payload = {
        "format_version": version,
        "package_version": _package_version(),
        "units": UNITS,
        **_potential_sections(potential, model_config),
        "training": extra or {},
        **({"ensemble": ensemble} if ensemble else {}),
        **(sections or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _potential_sections(potential: Potential, model_config: dict[str, Any]) -> dict[str, Any]:
    """The ``model``, ``potential``, ``runtime`` and ``physics`` sections of one potential."""
    state = {k: v.detach().cpu() for k, v in potential.model.state_dict().items()}
    return {
        "model": {"config": {**model_config, **potential.model.resolved_config()}, "state": state},
        "potential": {
            "cutoff": potential.cutoff,
            "atomic_energies": {z: float(potential.atomic_energies[z]) for z in potential.elements},
            "scale": float(potential.scale),
            "shift": float(potential.shift),
            "elements": potential.elements,
        },
        "runtime": {"kernels": potential.kernels, "compile": potential.compiled},
        "physics": potential.physics.to_section(),
    }


def _sections(payload: dict[str, Any]) -> dict[str, Any]:
    """The file's content in the sections of the current format (formats 1 and 2 wrote flat keys)."""
    if payload["format_version"] >= 3:
        return payload
    flat = ("model_config", "model_state", "cutoff", "atomic_energies", "scale", "shift", "elements", "extra")
    sections = {k: v for k, v in payload.items() if k not in flat}
    sections["model"] = {"config": payload.get("model_config"), "state": payload.get("model_state")}
    sections["potential"] = {k: payload[k] for k in flat[2:7] if k in payload}
    sections["training"] = payload.get("extra", {})
    return sections


def _required(path: Path, sections: dict[str, Any], section: str, key: str) -> Any:
    value = (sections.get(section) or {}).get(key)
    if value is None:
        raise PotentialsInputError(f"{path}: damaged model file, it has no {section}.{key}")
    return value


def _model_class(path: Path, config: dict[str, Any]) -> type[EnergyModel]:
    from hydra.utils import get_class

    target = config.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise PotentialsInputError(f"{path}: the model class {target} cannot be imported ({err})") from err
    if not issubclass(cls, EnergyModel):
        raise PotentialsInputError(f"{path}: the model class {target} is not an energy model (EnergyModel)")
    return cls


def _physics(path: Path, section: dict[str, Any] | None):
    """The file's physics terms (none without a section)."""
    from potentials.physics import PhysicsConfig

    try:
        return PhysicsConfig.from_options(section)
    except PotentialsInputError as err:
        raise PotentialsInputError(f"{path}: physics section: {err}; upgrade potentials") from err


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
         cutoff: float | None = None, compile: bool | None = None) -> Potential | EnsemblePotential:
    """Load a file written by :func:`save` as a :class:`Potential` in eval mode on ``device`` with ``dtype``.

    ``potential.metadata`` holds ``format_version``, ``package_version``, ``units``, ``elements``, ``model_config``
    (as upgraded and used), ``training`` (also as ``extra``, its name in formats 1 and 2), ``runtime``, ``physics``
    (as used; also ``potential.physics``), ``ensemble`` (kind, size, calibration; a file with one loads as an
    :class:`~potentials.uncertainty.EnsemblePotential`, which also gives the spread) and every section this version
    does not know, by name.

    Args:
        path: the model file.
        device, dtype: where and in which precision to run it.
        cutoff: the neighbour radius (Å) the caller means to use; it must be the one the model was trained with
            (None takes that one).
        compile: run the model through ``torch.compile`` (:class:`Potential`'s ``compile``); None takes the
            file's ``runtime.compile`` (false when absent).

    Raises:
        FileNotFoundError: no such file.
        PotentialsInputError: not a model file (a Lightning ``.ckpt``, a damaged file), a newer file format, weights
            that do not fit the model config, or another ``cutoff`` than the model's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise PotentialsInputError(f"{path}: not a readable potentials model file ({err}); a training checkpoint "
                                   "(.ckpt) is not a model file, the run directory's model.pt is") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("format_version"), int):
        raise PotentialsInputError(f"{path}: not a potentials model file (no format_version)")
    version = payload["format_version"]
    if version > FORMAT_VERSION:
        raise PotentialsInputError(
            f"{path}: written by potentials {payload.get('package_version')} in file format "
            f"{version}; this version reads format {FORMAT_VERSION} at most — upgrade potentials"
        )
    sections = _sections(payload)
    trained_cutoff = float(_required(path, sections, "potential", "cutoff"))
    if cutoff is not None and abs(float(cutoff) - trained_cutoff) > 1e-9:
        raise PotentialsInputError(
            f"{path}: the model was trained with a cutoff of {trained_cutoff} Å and cannot be used with "
            f"{cutoff} Å (its radial functions end at the training cutoff); leave the cutoff out to use the model's"
        )
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    ensemble = sections.get("ensemble")
    if ensemble is not None and (not isinstance(ensemble, dict) or ensemble.get("kind") not in ("committee", "shallow")
                                 or not isinstance(ensemble.get("members", []), list)):
        raise PotentialsInputError(f"{path}: an ensemble section this version cannot read (kind "
                                   f"{(ensemble or {}).get('kind') if isinstance(ensemble, dict) else '?'!r}); "
                                   "upgrade potentials")
    potential, config = _build(path, sections, version, ensemble)
    if ensemble:
        from potentials.uncertainty import EnsemblePotential

        members = [potential] + [_build(path, m, version, ensemble)[0] for m in ensemble.get("members") or []]
        potential = EnsemblePotential(members, kind=ensemble.get("kind", "committee"),
                                      calibration=ensemble.get("calibration"))
    training = sections.get("training") or {}
    potential.metadata = {
        "format_version": version,
        "package_version": sections.get("package_version"),
        "units": sections.get("units", UNITS),
        "elements": sections["potential"].get("elements", potential.elements),
        "model_config": config,
        "training": training,
        "extra": training,
        "runtime": {"kernels": "auto", "compile": False, **(sections.get("runtime") or {})},
        "physics": potential.physics.to_section(),
        **({"ensemble": {k: v for k, v in ensemble.items() if k != "members"}} if ensemble else {}),
        **{k: v for k, v in sections.items() if k not in SECTIONS},
    }
    if compile is not None:
        potential.compiled = bool(compile)
    return potential.to(device=device, dtype=dtype).eval()


def _build(path: Path, sections: dict[str, Any], version: int, ensemble: dict[str, Any] | None
           ) -> tuple[Potential, dict[str, Any]]:
    """The potential of one set of ``model``/``potential``/``runtime``/``physics`` sections, and its model config."""
    from hydra.utils import instantiate

    config = dict(_required(path, sections, "model", "config"))
    config = _model_class(path, config).upgrade_config(config, version)
    model = instantiate(config)
    if ensemble and ensemble.get("kind") == "shallow":
        from potentials.uncertainty import ShallowEnsemble

        model = ShallowEnsemble(model, int(ensemble["size"]))
    try:
        model.load_state_dict(_required(path, sections, "model", "state"))
    except RuntimeError as err:
        raise PotentialsInputError(f"{path}: the weights do not fit the model its config describes: {err}") from err
    atomic_energies = {int(k): float(v) for k, v in _required(path, sections, "potential", "atomic_energies").items()}
    runtime = {"kernels": "auto", "compile": False, **(sections.get("runtime") or {})}
    if runtime["kernels"] not in KERNELS:
        raise PotentialsInputError(f"{path}: runtime.kernels is {runtime['kernels']!r}, this version knows "
                                   f"{', '.join(map(repr, KERNELS))}; upgrade potentials")
    if not isinstance(runtime["compile"], bool):
        raise PotentialsInputError(f"{path}: runtime.compile is {runtime['compile']!r}, expected true or false")
    potential = Potential(
        model,
        cutoff=float(_required(path, sections, "potential", "cutoff")),
        atomic_energies=atomic_energies,
        scale=_required(path, sections, "potential", "scale"),
        shift=_required(path, sections, "potential", "shift"),
        kernels=runtime["kernels"],
        physics=_physics(path, sections.get("physics")),
        compile=runtime["compile"],
    )
    return potential, config
