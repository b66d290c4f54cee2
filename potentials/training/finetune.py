"""Fine-tuning: a new run whose model starts from a trained one (``init_from=``).

* :func:`load_base` reads the base (a ``model.pt`` or a Lightning ``.ckpt`` of a potentials run): its full model
  options, weights, cutoff, reference energies, scale/shift and physics terms.
* :func:`check_overrides` refuses model options given on the command line that contradict the base.
* :func:`init_potential` builds the run's :class:`~potentials.potential.Potential` from the base: the base's
  weights, fresh embedding rows for elements the base never saw, and reference energies for the union of the
  base's and the data's elements (``finetune.reference_energies``).
* :func:`apply_freeze` freezes parameters by name globs and logs a table of trainable/frozen counts per module.
* :func:`lineage` is the ``lineage`` section of the exported model: its base and every dataset it saw.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import logging
import math
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from potentials.errors import PotentialsInputError
from potentials.potential import NUM_Z, Potential

log = logging.getLogger("potentials")

#: ``finetune.reference_energies`` choices.
REFERENCE_ENERGIES = ("refit", "keep")
_ACCEPTED = ("init_from takes the model.pt of a potentials run, or a Lightning checkpoint (.ckpt) of one "
             "(<run dir>/checkpoints/best.ckpt or last.ckpt)")


@dataclass
class Base:
    """What a fine-tuning run takes from its base file."""

    path: Path
    kind: str  # "model" (model.pt) or "checkpoint" (.ckpt)
    model_config: dict[str, Any]  # full model options, _target_ included, defaults resolved
    state: dict[str, torch.Tensor]  # the model's state_dict (EMA weights where training used EMA)
    cutoff: float
    atomic_energies: dict[int, float]
    scale: float
    shift: float
    physics: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)  # the base run's recorded config / provenance
    lineage: dict[str, Any] | None = None
    format_version: int | None = None

    @property
    def elements(self) -> list[int]:
        return sorted(self.atomic_energies)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def load_base(path: str | Path) -> Base:
    """Read a base model file or checkpoint; every problem is a :class:`PotentialsInputError` of one paragraph.

    A committee's file gives its first member; ``<file>#<i>`` gives member i (what each member of a committee
    fine-tuned from a committee starts from).  A shallow ensemble's file is refused.

    Raises:
        FileNotFoundError: no file at ``path``.
        PotentialsInputError: a damaged file, a newer format, a checkpoint without recorded model options and no
            ``config.yaml`` of its run, weights that do not fit their model options.
    """
    member = None
    text = str(path)
    if not Path(text).is_file() and "#" in text and text.rpartition("#")[2].isdigit():
        text, _, index = text.rpartition("#")
        member = int(index)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"init_from={path}: no such file. {_ACCEPTED}.")
    if not zipfile.is_zipfile(path):
        raise PotentialsInputError(f"init_from={path}: the file is damaged or not a model (it is not a complete "
                                   f"torch archive; an interrupted copy?). {_ACCEPTED}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - Lightning checkpoints may hold more than plain data
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - re-raised as one paragraph naming the file
            raise PotentialsInputError(f"init_from={path}: the file cannot be read ({err}). {_ACCEPTED}.") from err
    if isinstance(payload, dict) and "state_dict" in payload:
        if member is not None:
            raise PotentialsInputError(f"init_from={path}#{member}: #<member> names a committee member in a model "
                                       "file; this is a checkpoint of a single run")
        return _from_checkpoint(path, payload)
    if isinstance(payload, dict) and "format_version" in payload:
        return _from_model_file(path, member)
    raise PotentialsInputError(f"init_from={path}: neither a potentials model file (no format_version) nor a "
                               f"Lightning checkpoint (no state_dict). {_ACCEPTED}.")


def committee_size(path: str | Path) -> int | None:
    """Members of the committee in model file ``path``; None for any other file (or no readable file)."""
    from potentials.export import load
    from potentials.uncertainty import EnsemblePotential

    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        potential = load(path)
    except Exception:  # noqa: BLE001 - not a model file: load_base reports it
        return None
    return potential.size if isinstance(potential, EnsemblePotential) and potential.kind == "committee" else None


def _from_model_file(path: Path, member: int | None = None) -> Base:
    from potentials.export import load
    from potentials.uncertainty import EnsemblePotential

    try:
        potential = load(path, dtype=torch.float64)  # float64 holds float32 weights exactly
    except PotentialsInputError as err:
        raise PotentialsInputError(f"init_from: {err}") from err
    meta = potential.metadata
    if isinstance(potential, EnsemblePotential):
        if potential.kind != "committee":
            raise PotentialsInputError(f"init_from={path}: a shallow ensemble's file; its readout heads cannot start "
                                       "a single-head model. Fine-tune from a single model or a committee, or "
                                       "retrain the shallow ensemble")
        index = 0 if member is None else member
        if index >= potential.size:
            raise PotentialsInputError(f"init_from={path}#{member}: the committee has {potential.size} members "
                                       f"(#0 to #{potential.size - 1})")
        log.info("init_from=%s: committee member %d of %d", path, index, potential.size)
        potential = potential.members[index]
    elif member is not None:
        raise PotentialsInputError(f"init_from={path}#{member}: #<member> names a committee member; this file holds "
                                   "a single model")
    return Base(path=path, kind="model", model_config=dict(meta["model_config"]),
                state=potential.model.state_dict(), cutoff=potential.cutoff,
                atomic_energies={z: float(potential.atomic_energies[z]) for z in potential.elements},
                scale=float(potential.scale), shift=float(potential.shift), physics=meta.get("physics"),
                config={"model": dict(meta["model_config"]), "training": meta.get("training") or {}},
                lineage=meta.get("lineage"), format_version=meta.get("format_version"))


def _from_checkpoint(path: Path, ckpt: dict[str, Any]) -> Base:
    from hydra.utils import instantiate

    from potentials.training.module import CHECKPOINT_FORMAT

    meta = ckpt.get("potentials") or {}
    version = meta.get("checkpoint_format", CHECKPOINT_FORMAT)
    if version > CHECKPOINT_FORMAT:
        raise PotentialsInputError(
            f"init_from={path}: written by potentials {meta.get('package_version')} in checkpoint format {version}; "
            f"this version reads format {CHECKPOINT_FORMAT} at most. Upgrade potentials, or fine-tune from the "
            "run's model.pt.")
    run_config: dict[str, Any] = {}
    for candidate in (path.parent.parent / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            run_config = OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)
            break
    model_config = meta.get("model_config") or run_config.get("model")
    if not model_config:
        raise PotentialsInputError(
            f"init_from={path}: this checkpoint was written before checkpoints recorded their model options, and "
            f"no config.yaml of its run lies next to it ({path.parent.parent / 'config.yaml'}). Fine-tune from "
            "the run's model.pt, or put the run's config.yaml back in the run directory.")
    model_config = dict(model_config)
    if any(isinstance(v, str) and "${" in v for v in model_config.values()):
        raise PotentialsInputError(f"init_from={path}: the model options in its run's config.yaml are not "
                                   "resolved (${...} left in them); fine-tune from the run's model.pt")
    state = ckpt["state_dict"]
    prefix = "ema." if any(k.startswith("ema.") for k in state) else "potential."  # the weights it evaluated
    try:
        model_state = {k[len(prefix) + 6:]: v for k, v in state.items() if k.startswith(prefix + "model.")}
        known = state[prefix + "known_elements"].bool()
        e0 = state[prefix + "atomic_energies"].double()
        scale, shift = float(state[prefix + "scale"]), float(state[prefix + "shift"])
    except KeyError as err:
        raise PotentialsInputError(f"init_from={path}: not a checkpoint of a potentials run (no {err} in its "
                                   f"weights). {_ACCEPTED}.") from err
    cutoff = meta.get("cutoff", run_config.get("cutoff", model_config.get("cutoff")))
    physics = meta.get("physics", run_config.get("physics"))
    base = Base(path=path, kind="checkpoint", model_config=model_config, state=model_state, cutoff=float(cutoff),
                atomic_energies={int(z): float(e0[z]) for z in torch.nonzero(known).flatten().tolist()},
                scale=scale, shift=shift, physics=physics,
                config=run_config or {"model": model_config}, lineage=meta.get("lineage"))
    _model_class(base)
    try:
        instantiate(base.model_config).load_state_dict(base.state)
    except RuntimeError as err:
        raise PotentialsInputError(f"init_from={path}: the weights do not fit the model options recorded with "
                                   f"them: {err}") from err
    return base


def _model_class(base: Base) -> None:
    from potentials.export import _model_class as model_class

    try:
        model_class(base.path, base.model_config)
    except PotentialsInputError as err:
        raise PotentialsInputError(f"init_from: {err}") from err


def explicit_overrides() -> list[str]:
    """The command line's task overrides (``key=value`` as typed), or none outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_overrides(overrides: Sequence[str], cfg: DictConfig, base: Base) -> None:
    """Refuse command-line model options (``model=...``, ``model.X=...``, ``cutoff=...``, ``physics.X=...``) that
    contradict the base file, naming each one."""
    from potentials.physics import PhysicsConfig

    file_model = OmegaConf.create(base.model_config)
    file_physics = OmegaConf.create(PhysicsConfig.from_options(base.physics).to_section())
    conflicts = []
    for item in overrides:
        key, _, _ = item.lstrip("+~").partition("=")
        if key == "model":
            asked = cfg.model.get("_target_")
            if asked != base.model_config.get("_target_"):
                conflicts.append(f"{item} (the file's model is {base.model_config.get('_target_')})")
        elif key.startswith("model."):
            name = key[len("model."):]
            asked = OmegaConf.select(cfg, key)
            theirs = OmegaConf.select(file_model, name, default="<absent>")
            asked = OmegaConf.to_container(asked, resolve=True) if OmegaConf.is_config(asked) else asked
            theirs = OmegaConf.to_container(theirs, resolve=True) if OmegaConf.is_config(theirs) else theirs
            if not _same(asked, theirs):
                conflicts.append(f"{item} (the file's {name} is {theirs})")
        elif key == "cutoff":
            if not _same(float(cfg.cutoff), base.cutoff):
                conflicts.append(f"{item} (the file's cutoff is {base.cutoff} Å)")
        elif key.startswith("physics."):
            name = key[len("physics."):]
            asked, theirs = OmegaConf.select(cfg, key), OmegaConf.select(file_physics, name, default=None)
            if not _same(asked, theirs):
                conflicts.append(f"{item} (the file's physics.{name} is {theirs})")
    if conflicts:
        raise PotentialsInputError(
            f"init_from={base.path}: the model options come from that file, and the command line contradicts it: "
            f"{'; '.join(conflicts)}. Leave these options out to fine-tune the file's model, or train a new model "
            "without init_from.")


def embedding_tables(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """The model's embeddings indexed by atomic number: every ``nn.Embedding`` with a row for each element."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.num_embeddings
            == NUM_Z]


#: ``finetune.new_elements`` choices: how the embedding rows of elements the base never saw start.
NEW_ELEMENTS = ("nearest", "mean", "random")


def periodic_position(z: int) -> tuple[int, int]:
    """(period, group) of element ``z`` in the 18-column table; lanthanides and actinides sit in group 3."""
    if z < 1 or z > 118:
        raise ValueError(f"no element with atomic number {z}")
    starts = (1, 3, 11, 19, 37, 55, 87, 119)  # first Z of each period
    period = next(p for p in range(1, 8) if z < starts[p])
    k = z - starts[period - 1]  # 0-based place in its period
    if period == 1:
        return 1, 1 if k == 0 else 18
    if period <= 3:
        return period, k + 1 if k < 2 else k + 11
    if period <= 5:
        return period, k + 1
    # periods 6 and 7: the 14 f-block elements after group 2 share group 3
    if k < 2:
        return period, k + 1
    if k < 17:
        return period, 3
    return period, k - 13


def nearest_known(z: int, known: Iterable[int]) -> int:
    """The known element closest to ``z`` in the periodic table: fewest groups apart first (chemistry follows the
    group), then fewest periods, then the lighter."""
    p, g = periodic_position(z)
    return min(known, key=lambda k: (abs(periodic_position(k)[1] - g), abs(periodic_position(k)[0] - p), k))


def init_potential(model: nn.Module, base: Base, data_elements: Iterable[int], new_elements: str = "nearest",
                   **potential_options: Any) -> tuple[Potential, list[int]]:
    """The run's Potential: ``model`` (freshly built from the base's options) with the base's weights; the
    embedding rows of elements the base never saw start as ``new_elements`` says:

    * ``nearest``: a copy of the row of the known element nearest in the periodic table (:func:`nearest_known`),
      so the new element starts as its chemical neighbour (Ni as Cu, S as O) and training only has to learn the
      difference;
    * ``mean``: the mean of the known elements' rows;
    * ``random``: the fresh initialisation of a model built from scratch.

    Reference energies start as the base's (new elements at 0); :func:`fit_reference_energies` fits them.

    Returns:
        (the potential, the new elements).
    """
    if new_elements not in NEW_ELEMENTS:
        raise PotentialsInputError(f"finetune.new_elements={new_elements!r}: choose one of {', '.join(NEW_ELEMENTS)}")
    new = sorted(set(int(z) for z in data_elements) - set(base.elements))
    fresh = {name: m.weight.detach().clone() for name, m in embedding_tables(model)}
    model.double()  # holds float32 and float64 weights exactly; the run casts to its dtype afterwards
    model.load_state_dict(base.state)
    known = [int(z) for z in base.elements]
    if new and known:  # a base without any known element has nothing to keep: all rows are its own
        with torch.no_grad():
            for name, m in embedding_tables(model):
                for z in new:
                    if new_elements == "nearest":
                        m.weight[z] = m.weight[nearest_known(z, known)]
                    elif new_elements == "mean":
                        m.weight[z] = m.weight[known].mean(dim=0)
                    else:
                        m.weight[z] = fresh[name][z].to(m.weight.dtype)
    potential = Potential(model, base.cutoff, atomic_energies={**base.atomic_energies, **{z: 0.0 for z in new}},
                          scale=base.scale, shift=base.shift, **potential_options)
    return potential, new


@torch.no_grad()
def fit_reference_energies(potential: Potential, graphs: Iterable, base: Base, new: Sequence[int], mode: str,
                           batch_size: int = 32, weights: Sequence[float] | None = None) -> dict[int, float]:
    """Reference energies E0 for the fine-tuning data, set on ``potential`` and returned.

    The residual r = E_label − (network + physics) of the base model on each training structure is what the
    reference energies must account for. ``keep``: the base's E0 of known elements stay; those of new elements are
    the least-squares fit of r − Σ E0_known. ``refit``: every element present in the data gets E0 = E0_base + δ,
    δ the minimum-norm least-squares fit of r − Σ E0_base (a constant offset between the base's and the new
    labels, e.g. another DFT setting, is absorbed; directions the data cannot tell apart stay at the base's
    values). Elements only the base knew keep their E0.

    ``weights`` (one per structure of ``graphs``, in order) make both fits weighted least squares: a mix passes its
    :meth:`~potentials.datasets.mix.MixDataModule.fit_weights`, so a few new structures trained on with a large
    weight are not outvoted by many replayed ones. None: every structure counts once.
    """
    from torch_geometric.data import Batch

    from potentials.datasets.stats import StreamingLeastSquares

    if mode not in REFERENCE_ENERGIES:
        raise PotentialsInputError(f"finetune.reference_energies={mode!r}: choose one of "
                                   f"{', '.join(REFERENCE_ENERGIES)}")
    e0 = potential.atomic_energies.detach().double().cpu().clone()
    unknowns = [int(z) for z in new]
    if mode == "refit":
        unknowns = sorted(set(unknowns) | {int(z) for z in potential.elements})
    if not unknowns:
        return {z: float(e0[z]) for z in potential.elements}
    was_training = potential.training
    potential.eval()
    fit = StreamingLeastSquares(len(unknowns))
    columns = torch.tensor(unknowns)
    chunk: list = []
    chunk_weights: list[float] = []
    weight_iter = None if weights is None else iter(weights)
    n_rows = 0

    def flush() -> int:
        batch = Batch.from_data_list(chunk)
        energy = potential(batch, compute_forces=False, compute_stress=False)["energy"].detach().double().cpu()
        counts = torch.zeros(batch.num_graphs, NUM_Z, dtype=torch.float64)
        counts.index_put_((batch.batch.cpu(), batch.z.cpu()), torch.ones_like(batch.z.cpu(), dtype=torch.float64),
                          accumulate=True)
        label = batch.energy.detach().double().cpu().reshape(-1)
        has = batch.has_energy.cpu().reshape(-1).bool()
        target = label - energy  # what a change δ of the unknowns' E0 must explain
        for i in torch.nonzero(has).flatten().tolist():
            fit.add(counts[i, columns].numpy(), float(target[i]), chunk_weights[i] if chunk_weights else None)
        chunk.clear()
        chunk_weights.clear()
        return int(has.sum())

    for g in graphs:
        chunk.append(g)
        if weight_iter is not None:
            w = next(weight_iter, None)
            if w is None:
                raise ValueError("fit_reference_energies: fewer weights than structures")
            chunk_weights.append(float(w))
        if len(chunk) >= batch_size:
            n_rows += flush()
    if chunk:
        n_rows += flush()
    potential.train(was_training)
    if n_rows == 0:
        log.warning("fine-tuning data has no energy labels: reference energies stay the base's (new elements 0)")
        return {z: float(e0[z]) for z in potential.elements}
    r = fit.factor()
    delta, *_ = np.linalg.lstsq(r[:, :-1], r[:, -1], rcond=None)
    for z, d in zip(unknowns, delta, strict=True):
        e0[z] += float(d)
    potential.atomic_energies.copy_(e0.to(potential.atomic_energies))
    result = {z: float(e0[z]) for z in potential.elements}
    from ase.data import chemical_symbols

    log.info("reference energies (%s): %s", mode, ", ".join(
        f"{chemical_symbols[z]} {result[z]:.4f}" + (" (new)" if z in new else
                                                   f" (base {base.atomic_energies[z]:.4f})" if z in unknowns else "")
        for z in potential.elements))
    return result


def apply_freeze(potential: Potential, patterns: Sequence[str]) -> list[str]:
    """Freeze (``requires_grad=False``) every parameter whose ``Potential.named_parameters()`` name matches a glob
    of ``patterns``; a glob matching nothing is an error. Returns the frozen names."""
    names = [name for name, _ in potential.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        tops = list(dict.fromkeys(module_keys(potential).values()))
        raise PotentialsInputError(f"finetune.freeze: {', '.join(unmatched)} match no parameter of the model; "
                                   f"names look like model.embedding.weight; the modules are {', '.join(tops)}")
    frozen = []
    for name, p in potential.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def module_keys(potential: nn.Module) -> dict[str, str]:
    """Parameter name → the module it is counted under in the table: ``model.<child>``, and one row per entry of a
    ``ModuleList`` child (``model.layers.0``, ...)."""
    lists = {f"{name}." for name, m in potential.named_modules() if isinstance(m, nn.ModuleList)}
    keys = {}
    for name, _ in potential.named_parameters():
        parts = name.split(".")
        keep = min(2, len(parts) - 1) or 1
        if ".".join(parts[:keep]) + "." in lists and len(parts) > keep + 1:
            keep += 1
        keys[name] = ".".join(parts[:keep])
    return keys


def parameter_table(potential: nn.Module) -> str:
    """A table of trainable and frozen parameter counts per module (rows in parameter order), with a total."""
    keys = module_keys(potential)
    rows: dict[str, list[int]] = {}
    for name, p in potential.named_parameters():
        row = rows.setdefault(keys[name], [0, 0])
        row[0 if p.requires_grad else 1] += p.numel()
    total = [sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())]
    width = max([len(k) for k in rows] + [6])
    lines = [f"{'module':<{width}}  {'trainable':>10}  {'frozen':>10}"]
    lines += [f"{k:<{width}}  {t:>10,}  {f:>10,}" for k, (t, f) in rows.items()]
    lines.append(f"{'total':<{width}}  {total[0]:>10,}  {total[1]:>10,}")
    return "\n".join(lines)


def dataset_record(cfg: DictConfig, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """A dataset as lineage records it: its name, resolved config and split sizes."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {"name": data.get("name"), "config": data, "structures": dict(sizes or {})}


def lineage(cfg: DictConfig, base: Base | None, sizes: dict[str, int], frozen: Sequence[str] = ()
            ) -> dict[str, Any]:
    """The exported model's ``lineage`` section: its base file (name, sha256, config) and every dataset it saw,
    the base's first."""
    seen: list[dict[str, Any]] = []
    record: dict[str, Any] = {"base": None}
    if base is not None:
        if base.lineage:
            seen = copy.deepcopy(list(base.lineage.get("datasets") or []))
        else:
            training = base.config.get("training") or {}
            data = base.config.get("data")
            name = training.get("data") if isinstance(training, dict) else None
            seen = [{"name": (data or {}).get("name", name), "config": data, "structures": {}}]
        record["base"] = {"file": base.path.name, "sha256": base.sha256(), "kind": base.kind,
                          "format_version": base.format_version, "elements": base.elements,
                          "config": _plain(base.config)}
        record["finetune"] = {"reference_energies": cfg.finetune.reference_energies, "lr": cfg.finetune.lr,
                              "freeze": list(cfg.finetune.freeze or []), "frozen_parameters": len(frozen)}
    record["datasets"] = seen + [dataset_record(cfg, sizes)]
    return record


def _plain(value: Any) -> Any:
    """Plain data (for a ``weights_only`` model file): mappings, lists, strings, numbers, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
