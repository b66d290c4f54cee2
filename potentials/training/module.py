"""PotentialModule: the LightningModule that trains a Potential on energies, forces and stress."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from potentials import keys
from potentials.potential import Potential
from potentials.training.loss import PotentialLoss
from potentials.training.metrics import PotentialMetrics

# ModuleDict keys may not shadow nn.Module attributes (``train``)
_KEY = {"train": "fit", "val": "val", "test": "test"}


class PotentialModule(L.LightningModule):
    """Trains ``potential``; validation, test and export use its exponential moving average (EMA) copy.

    Args:
        potential: the Potential to train.
        loss: a :class:`PotentialLoss`.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        scheduler: ``"cosine"`` (linear warmup then cosine decay to ``min_lr_ratio``·lr), ``"plateau"``
            (ReduceLROnPlateau on the validation loss) or ``"constant"``.
        warmup_steps: optimiser steps of linear warmup (cosine).
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine).
        plateau_factor, plateau_patience: ReduceLROnPlateau settings (epochs).
        ema_decay: EMA decay per optimiser step; 0 disables EMA.
    """

    def __init__(
        self,
        potential: Potential,
        loss: PotentialLoss,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.01,
        plateau_factor: float = 0.5,
        plateau_patience: int = 10,
        ema_decay: float = 0.99,
    ) -> None:
        super().__init__()
        self.potential = potential
        self.ema = copy.deepcopy(potential).requires_grad_(False) if ema_decay > 0 else None
        self.loss_fn = loss
        self.hp = dict(lr=lr, weight_decay=weight_decay, scheduler=scheduler, warmup_steps=warmup_steps,
                       min_lr_ratio=min_lr_ratio, plateau_factor=plateau_factor,
                       plateau_patience=plateau_patience, ema_decay=ema_decay)
        free = loss.free_atoms_only
        self.metrics = torch.nn.ModuleDict({s: PotentialMetrics(free) for s in ("fit", "val", "test")})

    @property
    def eval_potential(self) -> Potential:
        """The weights used for validation, test and export (EMA when enabled)."""
        return self.ema if self.ema is not None else self.potential

    def _step(self, potential: Potential, batch, split: str, train: bool) -> dict[str, torch.Tensor]:
        stress = self.loss_fn.needs_stress and bool(batch.has_stress.any())
        with torch.enable_grad():
            out = potential(batch, compute_forces=True, compute_stress=stress, create_graph=train)
        losses = self.loss_fn(out, batch)
        self.metrics[_KEY[split]].update({k: v.detach() for k, v in out.items()}, batch)
        n = batch.num_graphs
        for name, value in losses.items():
            self.log(f"{split}/loss" if name == "total" else f"{split}/loss_{name}", value.detach(),
                     batch_size=n, on_step=False, on_epoch=True, sync_dist=True, prog_bar=name == "total")
        return losses

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(self.potential, batch, "train", train=True)["total"]

    def validation_step(self, batch, batch_idx: int) -> None:
        self.eval_potential.eval()
        self._step(self.eval_potential, batch, "val", train=False)

    def test_step(self, batch, batch_idx: int) -> None:
        self.eval_potential.eval()
        self._step(self.eval_potential, batch, "test", train=False)

    def _log_epoch_metrics(self, split: str) -> None:
        values = self.metrics[_KEY[split]].compute()
        for name, value in values.items():
            self.log(f"{split}/{name}", value, prog_bar=split == "val" and name == "force_mae", sync_dist=False)
        self.metrics[_KEY[split]].reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def on_train_batch_end(self, outputs: Any, batch, batch_idx: int) -> None:
        if self.ema is None:
            return
        decay = min(self.hp["ema_decay"], (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.potential.parameters(), strict=True):
                e.lerp_(p.detach(), 1.0 - decay)
            for e, b in zip(self.ema.buffers(), self.potential.buffers(), strict=True):
                e.copy_(b)

    def configure_optimizers(self):
        hp = self.hp
        decay, no_decay = [], []
        for name, p in self.potential.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or "embedding" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp["lr"],
        )
        if hp["scheduler"] == "constant":
            return opt
        if hp["scheduler"] == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=hp["plateau_factor"], patience=hp["plateau_patience"])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"}}
        if hp["scheduler"] != "cosine":
            raise ValueError(f"scheduler must be cosine, plateau or constant, got {hp['scheduler']!r}")
        steps = self.trainer.estimated_stepping_batches
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        budget = getattr(timer, "_duration", None) if timer is not None else None
        total = int(steps) if math.isfinite(steps) else None
        if total is None and not budget:
            raise ValueError("scheduler=cosine needs an end: set trainer.max_epochs, trainer.max_steps or "
                             "trainer.max_time (or use training.scheduler=plateau)")
        warm = max(min(hp["warmup_steps"], total // 10 if total else hp["warmup_steps"]), 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            # progress through the run: by steps, or by wall-clock time when only trainer.max_time bounds it
            progress = (step - warm) / max(total - warm, 1) if total else timer.time_elapsed("train") / budget
            progress = min(progress, 1.0)
            return hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        with torch.enable_grad():
            out = self.eval_potential(batch, compute_forces=True, compute_stress=bool(batch.pbc.all()))
        return {k: v.detach() for k, v in out.items() if k != keys.VIRIAL}
