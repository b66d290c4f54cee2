"""One deployable file per trained model: ``save(potential, path, model_config)`` and ``load(path)``.

The file is a ``torch.save`` of plain data (loadable with ``weights_only=True``, no pickled classes):
the model's Hydra config (``_target_`` names the class), the weights (EMA weights when training used EMA), cutoff,
reference energies, scale/shift, the elements trained on, units and the package version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from potentials.errors import PotentialsInputError
from potentials.potential import Potential

#: 2: model_config holds what a model resolved from its defaults (``resolved_config()``, e.g. EquiformerV2's grids)
FORMAT_VERSION = 2
UNITS = {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å³ (ASE sign)"}


def _package_version() -> str:
    from potentials import __version__

    return __version__


def save(potential: Potential, path: str | os.PathLike, model_config: dict[str, Any],
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``potential`` to ``path`` (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in potential.model.state_dict().items()}
    payload = {
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "model_config": {**model_config, **_resolved(potential.model)},
        "model_state": state,
        "cutoff": potential.cutoff,
        "atomic_energies": {z: float(potential.atomic_energies[z]) for z in potential.elements},
        "scale": float(potential.scale),
        "shift": float(potential.shift),
        "elements": potential.elements,
        "units": UNITS,
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _resolved(model) -> dict[str, Any]:
    resolved = getattr(model, "resolved_config", None)
    return resolved() if callable(resolved) else {}


def _upgrade_config(payload: dict[str, Any]) -> dict[str, Any]:
    """The model config of an older file, with the defaults of the version that wrote it made explicit."""
    config = dict(payload["model_config"])
    if payload["format_version"] < 2 and str(config.get("_target_", "")).endswith("EquiformerV2"):
        lmax, mmax = int(config.get("lmax", 3)), int(config.get("mmax", 2))
        if config.get("grid_resolution") is None and lmax >= 3:  # node grids were 4(lmax+1) x 8(lmax+1) for all lmax
            config["grid_resolution"] = [4 * (lmax + 1), 8 * (lmax + 1)]
        if config.get("edge_grid_resolution") is None:  # edge grids were (lmax+1) x (8·mmax+8) for all lmax
            config["edge_grid_resolution"] = [lmax + 1, 8 * mmax + 8]
    return config


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
         cutoff: float | None = None) -> Potential:
    """Load a file written by :func:`save` as a :class:`Potential` in eval mode on ``device`` with ``dtype``.

    Args:
        path: the model file.
        device, dtype: where and in which precision to run it.
        cutoff: the neighbour radius (Å) the caller means to use; it must be the one the model was trained with
            (None takes that one).

    Raises:
        FileNotFoundError: no such file.
        PotentialsInputError: not a model file (a Lightning ``.ckpt``, a damaged file), a newer file format, weights
            that do not fit the model config, or another ``cutoff`` than the model's.
    """
    from hydra.utils import instantiate

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
    if payload["format_version"] > FORMAT_VERSION:
        raise PotentialsInputError(
            f"{path}: written by potentials {payload.get('package_version')} in file format "
            f"{payload['format_version']}; this version reads format {FORMAT_VERSION} at most — upgrade potentials"
        )
    if cutoff is not None and abs(float(cutoff) - float(payload["cutoff"])) > 1e-9:
        raise PotentialsInputError(
            f"{path}: the model was trained with a cutoff of {payload['cutoff']} Å and cannot be used with "
            f"{cutoff} Å (its radial functions end at the training cutoff); leave the cutoff out to use the model's"
        )
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    payload["model_config"] = _upgrade_config(payload)
    model = instantiate(payload["model_config"])
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as err:
        raise PotentialsInputError(f"{path}: the weights do not fit the model its config describes: {err}") from err
    potential = Potential(
        model,
        cutoff=payload["cutoff"],
        atomic_energies={int(k): v for k, v in payload["atomic_energies"].items()},
        scale=payload["scale"],
        shift=payload["shift"],
    )
    potential.metadata = {k: payload[k] for k in ("package_version", "units", "elements", "extra", "model_config")}
    return potential.to(device=device, dtype=dtype).eval()
