"""The training pipeline behind ``train.py``: data → statistics → model → Lightning fit → test → export."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from potentials.potential import Potential
from potentials.training.module import PotentialModule

log = logging.getLogger("potentials")


def wandb_offline() -> bool:
    """Offline unless the environment asks for online logging (WANDB_MODE=online or run)."""
    return os.environ.get("WANDB_MODE", "offline").lower() not in ("online", "run")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.resume in (None, "never", False):
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no checkpoint there")
    return str(path)


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, PotentialModule]:
    """Datamodule and LightningModule from a composed config (statistics written into ``cfg.data_stats``)."""
    dtype = getattr(torch, cfg.dtype)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    stats = dm.stats
    with open_dict(cfg):
        cfg.data_stats = {**stats.to_dict(), "atomic_energies": {str(k): v for k, v in stats.atomic_energies.items()}}
    model = instantiate(cfg.model)
    potential = Potential(model, cfg.cutoff, atomic_energies=stats.atomic_energies, scale=stats.force_rms)
    potential = potential.to(dtype)
    t = cfg.training
    module = PotentialModule(
        potential, instantiate(t.loss), lr=t.lr, weight_decay=t.weight_decay, scheduler=t.scheduler,
        warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio, plateau_factor=t.plateau_factor,
        plateau_patience=t.plateau_patience, ema_decay=t.ema_decay,
    )
    return dm, module


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test and export as the config says; returns a summary (paths and test metrics)."""
    register_resolvers()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm, module = build(cfg)
    n_params = sum(p.numel() for p in module.potential.parameters())
    log.info("data: %s | train %d, val %d, test %d structures | %d parameters", dm.name,
             len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"]), n_params)

    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        config = OmegaConf.to_container(cfg, resolve=True)
        logger.log_hyperparams({"config": config, "num_parameters": n_params})
    has_val = len(dm.splits["val"]) > 0
    monitor = cfg.training.monitor if has_val else "train/loss"
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="min",
                                 save_last=True, save_top_k=1, auto_insert_metric_name=False)
    callbacks = [checkpoint] + ([LearningRateMonitor("step")] if logger else [])
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    trainer.fit(module, datamodule=dm, ckpt_path=_resume_path(cfg, run_dir))
    summary: dict[str, Any] = {"run_dir": str(run_dir), "num_parameters": n_params,
                               "best_checkpoint": checkpoint.best_model_path or None,
                               "data_stats": OmegaConf.to_container(cfg.data_stats)}
    best = checkpoint.best_model_path or None
    if cfg.test and len(dm.splits["test"]):
        results = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
        summary["test"] = {k: float(v) for k, v in results[0].items()}
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

        path = save(module.eval_potential, run_dir / "model.pt", OmegaConf.to_container(cfg.model, resolve=True),
                    extra={"data": cfg.data.name, "test": summary.get("test", {})})
        summary["model"] = str(path)
    demo_split = "test" if dm.splits["test"] else "train"
    summary["_demo_atoms"] = dm.splits[demo_split][0].to_atoms()
    if trainer.is_global_zero:
        public = {k: v for k, v in summary.items() if not k.startswith("_")}
        (run_dir / "metrics.json").write_text(json.dumps(public, indent=2))
        summary["metrics"] = str(run_dir / "metrics.json")
    return summary


def _force_rms(graphs) -> float:
    f = [g.forces for g in graphs if bool(g.has_forces)]
    return float(torch.cat(f).double().pow(2).mean().sqrt()) if f else float("nan")
