"""The training pipeline behind ``train.py``: data → statistics → model → Lightning fit → test → export."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from potentials.accel.precision import configure_tf32
from potentials.datasets.stats import compute_stats
from potentials.errors import PotentialsInputError
from potentials.models.base import EnergyModel
from potentials.physics import PhysicsConfig, baseline
from potentials.potential import NUM_Z, Potential
from potentials.training import ensemble, finetune
from potentials.training.checkpointing import (
    AtomicCheckpointIO,
    checkpoint_callbacks,
    remove_stale_temporaries,
    resume_path,
)
from potentials.training.loggers import resuming_logger_kwargs
from potentials.training.module import PotentialModule
from potentials.training.progress import plain_progress

log = logging.getLogger("potentials")


def wandb_offline() -> bool:
    """Offline unless the environment asks for online logging (WANDB_MODE=online or run)."""
    return os.environ.get("WANDB_MODE", "offline").lower() not in ("online", "run")


def run_name() -> str | None:
    """``<model>-<data>`` from Hydra's runtime choices; None (the dashboard picks a name) without a Hydra run, as
    under the compose API."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choices = HydraConfig.get().runtime.choices
    return f"{choices.get('model', 'model')}-{choices.get('data', 'data')}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


def build(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[L.LightningDataModule, PotentialModule]:
    """Datamodule and LightningModule from a composed config (statistics written into ``cfg.data_stats``).

    With ``init_from``, the model options, cutoff and physics terms are the base file's (``overrides``, the
    command line's task overrides, may not contradict them; None reads them from Hydra) and the module's
    ``base`` attribute holds the loaded :class:`~potentials.training.finetune.Base`.
    """
    dtype = getattr(torch, cfg.dtype)
    base = None
    if cfg.get("init_from"):
        if ensemble.is_shallow(cfg):
            raise PotentialsInputError("init_from with ensemble.kind=shallow: a shallow ensemble's readout heads "
                                       "cannot start from a single-head model file; fine-tune a committee "
                                       "(ensemble.kind=committee) instead")
        base = finetune.load_base(cfg.init_from)
        finetune.check_overrides(finetune.explicit_overrides() if overrides is None else overrides, cfg, base)
        with open_dict(cfg):  # the file's model: its options, cutoff and physics terms
            cfg.model = base.model_config
            cfg.cutoff = base.cutoff
            cfg.physics = PhysicsConfig.from_options(base.physics).to_section()
        log.info("fine-tuning %s (%s, %s): its model options, weights and cutoff %.4g Å", base.path,
                 base.model_config.get("_target_"), base.kind, base.cutoff)
    try:
        dm = instantiate(cfg.data)
        dm.setup("fit")
        stats = dm.stats
    except PotentialsInputError:
        raise
    except (ValueError, PermissionError, InstantiationException) as err:  # how the adapters report unusable input
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
        raise PotentialsInputError(f"data={cfg.data.get('name', '?')}: {cause}") from err
    physics = PhysicsConfig.from_options(OmegaConf.to_container(cfg.physics) if cfg.get("physics") else None)
    if physics.any:  # the network learns the labels minus the physics terms: statistics of those
        stats = compute_stats(dm.splits["train"], baseline=baseline(physics, cfg.cutoff), weights=fit_weights(dm))
    with open_dict(cfg):
        cfg.data_stats = {**stats.to_dict(), "atomic_energies": {str(k): v for k, v in stats.atomic_energies.items()}}
    tables = _reference_tables(cfg, dm, stats, physics, base)
    model = instantiate(cfg.model)
    if base is not None:
        return dm, _finetune_module(cfg, dm, model, base, physics, dtype)
    if not isinstance(model, EnergyModel):
        raise PotentialsInputError(f"model._target_={cfg.model.get('_target_')} is not an energy model (a subclass "
                                   "of potentials.models.base.EnergyModel)")
    model = ensemble.wrap_model(model, cfg)  # readout heads of a shallow ensemble
    model_cutoff = model.cutoff
    if abs(model_cutoff - float(cfg.cutoff)) > 1e-9:
        raise PotentialsInputError(f"model.cutoff={model_cutoff} Å differs from cutoff={cfg.cutoff} Å, the radius the "
                                   "neighbour lists are built with; set the top-level cutoff only")
    own = tables[dm.export_references] if tables else stats.atomic_energies
    potential = Potential(model, cfg.cutoff, atomic_energies=own, scale=stats.force_rms,
                          kernels=cfg.kernels, physics=physics, compile=bool(cfg.get("compile", False)))
    potential = potential.to(dtype)
    t = cfg.training
    loss = ensemble.wrap_loss(instantiate(t.loss), cfg)  # the heads' NLL term of a shallow ensemble
    module = PotentialModule(
        potential, loss, lr=t.lr, weight_decay=t.weight_decay, scheduler=t.scheduler,
        warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio, schedule_by=t.get("schedule_by", "budget"),
        plateau_factor=t.plateau_factor,
        plateau_patience=t.plateau_patience, ema_decay=t.ema_decay, datasets=getattr(dm, "names", ()),
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
        reference_offsets=_reference_offsets(tables, dm.names, own) if tables else None,
    )
    return dm, module


def fit_weights(dm) -> list[float] | None:
    """Per-structure weights of the training split for the reference-energy fits: a mix's sampling weights
    (:meth:`~potentials.datasets.mix.MixDataModule.fit_weights`), None (unweighted) for a single dataset."""
    weights = getattr(dm, "fit_weights", None)
    return weights() if callable(weights) else None


def _reference_tables(cfg: DictConfig, dm, stats, physics: PhysicsConfig, base) -> dict | None:
    """A mix with ``data.per_dataset_references``: the reference-energy table of each dataset (recorded in
    ``cfg.data_stats.reference_tables``); None otherwise."""
    if not getattr(dm, "per_dataset_references", False):
        return None
    if base is not None:
        raise PotentialsInputError("data.per_dataset_references=true with init_from: fine-tuning refits one "
                                   "reference-energy table (finetune.reference_energies); per-dataset tables are for "
                                   "runs from scratch, so drop one of the two")
    tables = dm.reference_tables(stats.atomic_energies,
                                 baseline=baseline(physics, cfg.cutoff) if physics.any else None)
    with open_dict(cfg):
        cfg.data_stats.reference_tables = {n: {str(z): e for z, e in t.items()} for n, t in tables.items()}
        cfg.data_stats.export_references = dm.export_references
    log.info("per-dataset reference energies; model.pt carries those of %s", dm.export_references)
    return tables


def _reference_offsets(tables: dict, names: list[str], own: dict) -> torch.Tensor:
    """[datasets, 119]: each dataset's table minus the potential's own (``own``), eV."""
    offsets = torch.zeros(len(names), NUM_Z, dtype=torch.float64)
    for k, name in enumerate(names):
        for z, e in tables[name].items():
            offsets[k, int(z)] = e - own[z]
    return offsets


def _finetune_module(cfg: DictConfig, dm, model: EnergyModel, base, physics: PhysicsConfig, dtype: torch.dtype
                     ) -> PotentialModule:
    """The module of an ``init_from`` run: the base's weights (fresh embedding rows for new elements), reference
    energies as ``finetune.reference_energies`` says, ``finetune.freeze`` applied, ``finetune.lr``."""
    ft = cfg.finetune
    elements = [int(z) for z in cfg.data_stats.atomic_energies]
    mode = ft.get("new_elements", "nearest")
    potential, new = finetune.init_potential(model, base, elements, mode, kernels=cfg.kernels, physics=physics)
    potential.compiled = bool(cfg.get("compile", False))
    potential = potential.to(dtype)
    if new:
        from ase.data import chemical_symbols

        start = {z: f"as {chemical_symbols[finetune.nearest_known(z, base.elements)]}" if mode == "nearest" else mode
                 for z in new}
        log.info("elements the base never saw: %s (embedding rows: finetune.new_elements=%s; reference energies "
                 "fitted)", ", ".join(f"{chemical_symbols[z]} ({start[z]})" for z in new), mode)
    finetune.fit_reference_energies(potential, dm.splits["train"], base, new, ft.reference_energies,
                                    weights=fit_weights(dm))
    frozen = finetune.apply_freeze(potential, list(ft.freeze or []))
    log.info("parameters (finetune.freeze=%s):\n%s", list(ft.freeze or []), finetune.parameter_table(potential))
    t = cfg.training
    log.info("fine-tuning learning rate finetune.lr=%g (training.lr=%g is for runs from scratch)", ft.lr, t.lr)
    module = PotentialModule(  # the EMA copy is taken here: it starts from the base's weights
        potential, instantiate(t.loss), lr=ft.lr, weight_decay=t.weight_decay, scheduler=t.scheduler,
        warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio, schedule_by=t.get("schedule_by", "budget"),
        plateau_factor=t.plateau_factor,
        plateau_patience=t.plateau_patience, ema_decay=t.ema_decay, datasets=getattr(dm, "names", ()),
        model_config={**OmegaConf.to_container(cfg.model, resolve=True), **model.resolved_config()},
        lr_scales=OmegaConf.to_container(ft.lr_scales) if ft.get("lr_scales") else None,
    )
    module.base, module.frozen = base, frozen
    return module


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, test and export as the config says; returns a summary (paths and test metrics).

    ``overrides``: the command line's task overrides that ``init_from`` checks (None: Hydra's).
    """
    register_resolvers()
    if ensemble.is_committee(cfg):  # member by member, each a run of its own
        return ensemble.run_committee(cfg, run)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm, module = build(cfg, overrides)
    n_params = sum(p.numel() for p in module.potential.parameters())
    log.info("data: %s | train %d, val %d, test %d structures | %d parameters", dm.name,
             len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"]), n_params)

    _report_labels(dm.splits["train"], module.loss_fn)

    ckpt_path = resume_path(cfg.resume, run_dir)
    logger = False
    if cfg.get("logger"):
        logger = instantiate(cfg.logger, **resuming_logger_kwargs(cfg.logger.get("_target_", ""), run_dir, ckpt_path))
        config = OmegaConf.to_container(cfg, resolve=True)
        logger.log_hyperparams({"config": config, "num_parameters": n_params})
    has_val = len(dm.splits["val"]) > 0
    monitor = cfg.training.monitor if has_val else "train/loss"
    if has_val and hasattr(dm, "monitor_dataset"):  # data=mix: best.ckpt by one dataset's metric, or pooled
        monitor = _mix_monitor(monitor, dm)
    every = cfg.get("checkpoint") or {}
    steps = every.get("every_n_train_steps")  # when set, replaces the time-based trigger
    checkpoint, checkpoints = checkpoint_callbacks(run_dir / "checkpoints", monitor, steps,
                                                   None if steps else every.get("every_n_minutes"))
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks = checkpoints + ([LearningRateMonitor("step")] if logger else []) + extra
    # stdout not a terminal (a file, a batch job): progress as a log line per epoch instead of bar redraws
    callbacks += plain_progress(callbacks, bool(cfg.trainer.get("enable_progress_bar", True)))
    plugins = list(instantiate(cfg.trainer.get("plugins")) or [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())  # every checkpoint written atomically: a kill never leaves half a file
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, plugins=plugins, **_cpu_determinism(cfg))
    configure_tf32(bool(cfg.get("tf32", False)), trainer.strategy.root_device, cfg.dtype)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    if rank_zero_only.rank == 0:  # before fit, the launcher's environment knows the rank; the trainer may not
        remove_stale_temporaries(run_dir / "checkpoints")
    if ckpt_path and cfg.get("init_from"):
        log.info("init_from=%s: the run directory already holds a checkpoint, so this run resumes from it (resume "
                 "wins; the base file only gave the model its options)", cfg.init_from)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
        module.checkpoint_source = ckpt_path
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "num_parameters": n_params,
                               "_global_zero": trainer.is_global_zero,
                               "best_checkpoint": checkpoint.best_model_path or None,
                               "data_stats": OmegaConf.to_container(cfg.data_stats)}
    best = checkpoint.best_model_path or None
    if cfg.test and len(dm.splits["test"]):
        results = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
        summary["test"] = {k: float(v) for r in results for k, v in r.items()}  # a mix: one loader per dataset
        summary["test"]["force_rms_meV_per_A"] = _force_rms(dm.splits["test"]) * 1e3
        if cfg.get("figures", True) and trainer.is_global_zero:  # parity plots etc. → <run dir>/figures, loggers
            from potentials.evaluate import report_split

            summary["figures"] = report_split(module.eval_potential, dm.splits["test"], run_dir / "figures",
                                              loggers=trainer.loggers, step=trainer.global_step,
                                              free_atoms_only=module.loss_fn.free_atoms_only)
    elif best:
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    if cfg.export and trainer.is_global_zero:
        from potentials.export import save

        exported, info = ensemble.for_export(module.eval_potential, cfg, dm.splits)  # calibrated heads
        summary.update(info)
        path = save(exported, run_dir / "model.pt", OmegaConf.to_container(cfg.model, resolve=True),
                    extra={"data": cfg.data.name, "test": summary.get("test", {})},
                    sections={"lineage": finetune.lineage(cfg, getattr(module, "base", None),
                                                          {k: len(v) for k, v in dm.splits.items()},
                                                          getattr(module, "frozen", ())),
                              **_references_section(cfg)})
        summary["model"] = str(path)
    demo_split = "test" if dm.splits["test"] else "train"
    summary["_demo_atoms"] = dm.splits[demo_split][0].to_atoms()
    summary["_device"] = str(trainer.strategy.root_device)  # where the demo relaxation runs
    if trainer.is_global_zero:
        public = {k: v for k, v in summary.items() if not k.startswith("_")}
        (run_dir / "metrics.json").write_text(json.dumps(public, indent=2))
        summary["metrics"] = str(run_dir / "metrics.json")
    return summary


def _references_section(cfg: DictConfig) -> dict[str, Any]:
    """The model file's ``references`` section (a mix with per-dataset reference energies; information only, the
    file's ``potential.atomic_energies`` are those of ``dataset``): {} otherwise."""
    tables = cfg.data_stats.get("reference_tables")
    if not tables:
        return {}
    return {"references": {"dataset": cfg.data_stats.export_references,
                           "tables": {n: {int(z): float(e) for z, e in t.items()} for n, t in tables.items()}}}


def _mix_monitor(monitor: str, dm) -> str:
    """The metric ``best.ckpt`` follows in a mix: ``val/<data.monitor_dataset>/<metric>`` when that is set, else
    ``training.monitor`` as given (pooled, or naming a dataset itself); the dataset must exist and have a val split."""
    split, _, metric = monitor.partition("/")
    name = dm.monitor_dataset
    if name is None and "/" in metric:  # training.monitor=val/<name>/<metric>
        name, _, metric = metric.partition("/")
        if name not in dm.names:
            raise PotentialsInputError(f"training.monitor={monitor} names the dataset {name!r}, which is not in the "
                                       f"mix; the datasets are {', '.join(dm.names)}")
    if name is None:
        return monitor
    if name not in dm.loader_names["val"]:
        raise PotentialsInputError(f"dataset {name!r} of the mix, chosen to pick best.ckpt by, has an empty "
                                   f"validation split; give it a val split or monitor the pooled {split}/{metric}")
    return f"{split}/{name}/{metric}"


def _cpu_determinism(cfg: DictConfig) -> dict[str, Any]:
    """``deterministic="warn"`` for CPU training when ``trainer.deterministic`` is unset, else nothing.

    On CPUs, PyTorch sums the float32 gradient of tensor indexing (``x[index]``, used for every gather over edges) with
    atomic adds from several threads, in an order that changes from run to run; its deterministic mode sums them on one
    thread instead and changes nothing else on CPUs. With it, a run and its resumed copies give the same bits.
    """
    t = cfg.trainer
    cpu = t.get("accelerator") == "cpu" or (t.get("accelerator") == "auto" and not torch.cuda.is_available()
                                            and not torch.backends.mps.is_available())
    return {"deterministic": "warn"} if cpu and t.get("deterministic") is None else {}


def _report_labels(graphs, loss) -> None:
    """Log how many training structures carry each label; refuse a split with none of the weighted labels.

    Structures without a label leave that term out of the loss (nothing is filled in), so the count is reported.
    Only in-memory splits are counted (an on-disk store would have to be read through).
    """
    if not isinstance(graphs, list):
        return
    counts = {k: sum(bool(getattr(g, f"has_{k}")) for g in graphs) for k in loss.weights}
    log.info("labels in the training split (%d structures): %s", len(graphs),
             ", ".join(f"{k} {n}" for k, n in counts.items()))
    weighted = {k: n for k, n in counts.items() if loss.weights[k] > 0}
    if weighted and not any(weighted.values()):
        raise PotentialsInputError(f"no training structure has a label the loss uses ({', '.join(weighted)}); "
                                   "check the energy/forces keys of the data, or the training.loss weights")
    for k, n in weighted.items():
        if n < len(graphs):
            log.info("%d of %d training structures have no %s label; they are left out of the %s loss term",
                        len(graphs) - n, len(graphs), k, k)


def _force_rms(graphs) -> float:
    """RMS of the force components (eV/Å) over the structures with forces, in one pass (memory flat in size)."""
    total, count = 0.0, 0
    for g in graphs:
        if bool(g.has_forces):
            total += float(g.forces.double().pow(2).sum())
            count += g.forces.numel()
    return (total / count) ** 0.5 if count else float("nan")
