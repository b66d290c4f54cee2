"""PotentialModule: the LightningModule that trains a Potential on energies, forces and stress."""

from __future__ import annotations

import copy
import fnmatch
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from potentials import __version__, keys
from potentials.errors import PotentialsInputError
from potentials.potential import Potential
from potentials.training.loggers import CSVLogger
from potentials.training.loss import PotentialLoss
from potentials.training.metrics import PotentialMetrics
from potentials.training.schedule import WarmupCosine

# ModuleDict keys may not shadow nn.Module attributes (``train``)
_KEY = {"train": "fit", "val": "val", "test": "test"}
#: Version of what :meth:`PotentialModule.on_save_checkpoint` adds to a Lightning checkpoint.
CHECKPOINT_FORMAT = 1


class PotentialModule(L.LightningModule):
    """Trains ``potential``; validation, test and export use its exponential moving average (EMA) copy.

    Data-parallel training (DDP) gives the same optimiser steps as one process with the same global batch: each
    loss term is normalised by its count over the global batch (summed across processes), so DDP's gradient
    average equals the gradient of the global mean. The EMA is updated after every optimiser step from the
    parameters, which DDP keeps identical on all processes, so the EMA copies stay identical too.

    Args:
        potential: the Potential to train.
        loss: a :class:`PotentialLoss`.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        scheduler: ``"cosine"`` (linear warmup then cosine decay to ``min_lr_ratio``·lr), ``"plateau"``
            (ReduceLROnPlateau on the validation loss) or ``"constant"``.
        warmup_steps: optimiser steps of linear warmup (cosine).
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine).
        schedule_by: what drives the cosine schedule (:mod:`potentials.training.schedule`): ``"budget"``, the
            larger of the fractions of the step budget and of ``trainer.max_time`` spent; ``"steps"``, the steps
            alone (bit-reproducible).
        plateau_factor, plateau_patience: ReduceLROnPlateau settings (epochs).
        ema_decay: EMA decay per optimiser step; 0 disables EMA.
        datasets: names of the datasets of a mix (``data=mix``): validation and test log ``<split>/<name>/<metric>``
            for each besides the pooled ``<split>/<metric>``; the datamodule's ``loader_names`` maps loaders to names.
        model_config: the model's full options (Hydra config, ``_target_`` included), recorded in every
            checkpoint so that ``init_from`` can rebuild the model from the checkpoint alone.
        lr_scales: learning-rate factors by glob over ``Potential.named_parameters()`` names (the first matching
            glob counts); other parameters train at ``lr``.
        reference_offsets: [datasets, 119] eV, for a mix with ``data.per_dataset_references``: E0_k[z] minus the
            potential's own E0[z] for dataset k; a structure of a batch with ``dataset_id`` k is trained and
            scored with its energy raised by Σ_i offsets[k, z_i] (the exported potential keeps its own table).
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
        schedule_by: str = "budget",
        plateau_factor: float = 0.5,
        plateau_patience: int = 10,
        ema_decay: float = 0.99,
        datasets: tuple[str, ...] | list[str] = (),
        model_config: dict[str, Any] | None = None,
        lr_scales: dict[str, float] | None = None,
        reference_offsets: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.potential = potential
        self.ema = copy.deepcopy(potential).requires_grad_(False) if ema_decay > 0 else None
        self.loss_fn = loss
        self.model_config = model_config
        self.lr_scales = lr_scales
        self.hp = dict(lr=lr, weight_decay=weight_decay, scheduler=scheduler, warmup_steps=warmup_steps,
                       min_lr_ratio=min_lr_ratio, schedule_by=schedule_by, plateau_factor=plateau_factor,
                       plateau_patience=plateau_patience, ema_decay=ema_decay)
        free = loss.free_atoms_only
        self.metrics = torch.nn.ModuleDict(
            {s: PotentialMetrics(free, loss_weights=loss.weights) for s in ("fit", "val", "test")})
        self.dataset_names = list(datasets)
        self.dataset_metrics = torch.nn.ModuleDict(  # keyed by position: names may hold characters keys may not
            {f"{s}{i}": PotentialMetrics(free, loss_weights=loss.weights) for s in ("val", "test")
             for i in range(len(self.dataset_names))})
        if reference_offsets is not None:  # a buffer only then: runs without keep their checkpoints' contents
            self.register_buffer("reference_offsets", torch.as_tensor(reference_offsets, dtype=torch.float64))

    @property
    def eval_potential(self) -> Potential:
        """The weights used for validation, test and export (EMA when enabled)."""
        return self.ema if self.ema is not None else self.potential

    def _global_counts(self, terms: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each term's element count over the global batch divided by the number of processes (DDP)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return {name: count for name, (_, count) in terms.items()}
        local = torch.stack([count for _, count in terms.values()])
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        return {name: total[i] / world for i, name in enumerate(terms)}

    def _split_metrics(self, split: str, dataloader_idx: int) -> list[PotentialMetrics]:
        """The pooled metrics of ``split`` and, for a mix of datasets, those of the loader's dataset."""
        found = [self.metrics[_KEY[split]]]
        if split != "train" and self.dataset_names:
            name = self.trainer.datamodule.loader_names[split][dataloader_idx]
            found.append(self.dataset_metrics[f"{split}{self.dataset_names.index(name)}"])
        return found

    def _step(self, potential: Potential, batch, split: str, train: bool,
              dataloader_idx: int = 0) -> torch.Tensor | None:
        stress = self.loss_fn.needs_stress and bool(batch.has_stress.any())
        with torch.enable_grad():
            out = potential(batch, compute_forces=True, compute_stress=stress, create_graph=train,
                            head_forces=getattr(self.loss_fn, "needs_head_forces", False))
        out = self._dataset_references(out, batch)
        terms = self.loss_fn.terms(out, batch)
        if not terms:
            raise PotentialsInputError("the loss has no term: training.loss weights are all zero")
        for metric in self._split_metrics(split, dataloader_idx):
            metric.update({k: v.detach() for k, v in out.items()}, batch,
                          {k: (s.detach(), c) for k, (s, c) in terms.items()})
        if not train:
            return None
        loss = self.loss_fn.combine(terms, self._global_counts(terms))["total"]
        # mean over processes of the per-process losses = the loss of the global batch
        logged = loss.detach()
        if self._trainer is None:
            return loss
        if self.trainer.world_size > 1:
            logged = self.trainer.strategy.reduce(logged.clone(), reduce_op="mean")
        self.log("train/loss_step", logged, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch.num_graphs)
        if (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0:  # Lightning logs this step's row
            self._unlogged_row = (self.global_step, self.current_epoch, logged)
        return loss

    def _dataset_references(self, out: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        """``out`` with each structure's energies moved to its dataset's reference energies (a mix with
        per-dataset references; otherwise ``out`` itself). Forces and stress do not depend on them."""
        offsets = getattr(self, "reference_offsets", None)
        index = getattr(batch, "dataset_id", None)
        if offsets is None or index is None:
            return out
        node = getattr(batch, "batch", None)
        if node is None:
            node = torch.zeros_like(batch.z)
        node_offset = offsets[index[node], batch.z].to(out[keys.NODE_ENERGY].dtype)
        energy_offset = torch.zeros_like(out[keys.ENERGY]).index_add(0, node, node_offset)
        out = dict(out)
        out[keys.ENERGY] = out[keys.ENERGY] + energy_offset
        out[keys.NODE_ENERGY] = out[keys.NODE_ENERGY] + node_offset
        if keys.ENERGY_HEADS in out:
            out[keys.ENERGY_HEADS] = out[keys.ENERGY_HEADS] + energy_offset.unsqueeze(-1)
        if keys.NODE_ENERGY_HEADS in out:
            out[keys.NODE_ENERGY_HEADS] = out[keys.NODE_ENERGY_HEADS] + node_offset.unsqueeze(-1)
        return out

    # Lightning writes a step's logged row after on_train_batch_end, where mid-epoch checkpoints are taken. The
    # checkpoint carries that row, so a run killed between the checkpoint and the row's write still gets it back.
    _unlogged_row: tuple[int, int, torch.Tensor] | None = None

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._unlogged_row = None  # the previous step's row has been handed to the loggers
        self._restate_logged_step()

    def _restate_logged_step(self) -> None:
        """The loggers' step is the number of optimiser steps. Resuming a checkpoint taken at an epoch's end under
        ``max_steps``, Lightning replays the end of that epoch and counts one step too many from then on (rows would
        be logged one step late); the count is restated at every epoch end and step."""
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step

    def on_validation_start(self) -> None:
        self._unlogged_row = None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(self.potential, batch, "train", train=True)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_potential.eval()
        self._step(self.eval_potential, batch, "val", train=False, dataloader_idx=dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_potential.eval()
        self._step(self.eval_potential, batch, "test", train=False, dataloader_idx=dataloader_idx)

    def _log_epoch_metrics(self, split: str) -> None:
        metric = self.metrics[_KEY[split]]
        values = metric.compute()  # already summed over processes: the mean in sync_dist below changes nothing
        for name, value in values.items():
            self.log(f"{split}/{name}", torch.tensor(value, dtype=torch.float64), sync_dist=True,
                     prog_bar=(split == "val" and name == "force_mae") or (split == "train" and name == "loss"),
                     add_dataloader_idx=False)
        metric.reset()
        if split == "train":
            return
        for i, dataset in enumerate(self.dataset_names):  # a mix: the same metrics per dataset
            metric = self.dataset_metrics[f"{split}{i}"]
            if metric.update_count:
                for name, value in metric.compute().items():
                    self.log(f"{split}/{dataset}/{name}", torch.tensor(value, dtype=torch.float64), sync_dist=True,
                             add_dataloader_idx=False)
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._unlogged_row = None
        self._restate_logged_step()  # before the checkpoint callbacks save it
        if self.metrics["fit"].update_called:  # not in the replay of a finished epoch's end after a resume
            self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then the EMA update (before any callback can checkpoint the step)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._update_ema(self.global_step + 1)

    @torch.no_grad()
    def _update_ema(self, steps: int) -> None:
        """EMA ← decay·EMA + (1 − decay)·weights, with decay warming up as (1 + steps)/(10 + steps)."""
        if self.ema is None:
            return
        decay = min(self.hp["ema_decay"], (1 + steps) / (10 + steps))
        # one call over the trained parameters (the EMA copy has the model's parameter list); frozen ones are left
        # alone, so that they stay bit-identical in the EMA copy too
        pairs = [(e, p.detach()) for e, p in zip(self.ema.parameters(), self.potential.parameters(), strict=True)
                 if p.requires_grad]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.potential.buffers(), strict=True):
            e.copy_(b)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # logged rows reach the disk before the checkpoint does: a kill right after the checkpoint loses none
        for logger in self.loggers:
            logger.save()
        checkpoint["potentials"] = {"checkpoint_format": CHECKPOINT_FORMAT, "package_version": __version__,
                                    "cutoff": self.potential.cutoff, "physics": self.potential.physics.to_section()}
        if self.model_config is not None:  # what init_from rebuilds the model from
            checkpoint["potentials"]["model_config"] = {**self.model_config,
                                                        **self.potential.model.resolved_config()}
        if self._unlogged_row is not None:
            step, epoch, value = self._unlogged_row
            checkpoint["potentials"]["unlogged_row"] = {"step": step,
                                                        "metrics": {"epoch": epoch, "train/loss_step": float(value)}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with a clear message, checkpoints of a newer format, another cutoff or another model."""
        source = getattr(self, "checkpoint_source", None) or "the checkpoint"
        meta = checkpoint.get("potentials") or {}
        if meta.get("checkpoint_format", CHECKPOINT_FORMAT) > CHECKPOINT_FORMAT:
            raise PotentialsInputError(
                f"{source} was written by potentials {meta.get('package_version')} in checkpoint format "
                f"{meta['checkpoint_format']}; this version ({__version__}) reads format {CHECKPOINT_FORMAT} at most. "
                "Upgrade potentials, or start afresh with resume=never.")
        cutoff = meta.get("cutoff")
        if cutoff is not None and not math.isclose(cutoff, self.potential.cutoff, rel_tol=1e-9):
            raise PotentialsInputError(
                f"{source} was trained with cutoff {cutoff} Å but the config asks for {self.potential.cutoff} Å; "
                f"a model's cutoff is fixed by training: set cutoff={cutoff}, or start afresh with resume=never.")
        own = self.state_dict()
        theirs = checkpoint.get("state_dict", {})
        problems = [f"missing {k}" for k in own if k not in theirs]
        problems += [f"unexpected {k}" for k in theirs if k not in own]
        problems += [f"{k}: checkpoint {tuple(v.shape)}, config {tuple(own[k].shape)}" for k, v in theirs.items()
                     if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise PotentialsInputError(
                f"{source} holds a different model than the config describes ({shown}). Resume with the model "
                "options it was trained with, or start afresh with resume=never.")
        row = meta.get("unlogged_row")
        if row is not None:
            for logger in self.loggers:
                if isinstance(logger, CSVLogger):
                    logger.restore_row(row["metrics"], row["step"])

    def configure_optimizers(self):
        hp = self.hp
        scales = dict(self.lr_scales or {})
        matched = set()
        groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
        for name, p in self.potential.named_parameters():
            if p.requires_grad:
                glob = next((g for g in scales if fnmatch.fnmatchcase(name, g)), None)
                matched.add(glob)
                scale = float(scales[glob]) if glob is not None else 1.0
                groups.setdefault((scale, not (p.ndim <= 1 or "embedding" in name)), []).append(p)
        unmatched = [g for g in scales if g not in matched]
        if unmatched:
            raise PotentialsInputError(f"finetune.lr_scales: {', '.join(unmatched)} match no trained parameter "
                                       "(names as in Potential.named_parameters(), e.g. model.readout.*)")
        params = [p for group in groups.values() for p in group]
        # the fused kernel (CPU and CUDA): one call per parameter instead of ~10
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW(  # decayed then undecayed at scale 1 first: the groups of runs without scales
            [{"params": group, "weight_decay": hp["weight_decay"] if decay else 0.0, "lr": hp["lr"] * scale}
             for (scale, decay), group in groups.items() if group or scale == 1.0],
            lr=hp["lr"], fused=fused or None,
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
        if hp["schedule_by"] not in ("budget", "steps"):
            raise ValueError(f"training.schedule_by must be budget or steps, got {hp['schedule_by']!r}")
        if hp["schedule_by"] == "steps":
            if total is None:
                raise ValueError("training.schedule_by=steps needs trainer.max_steps or trainer.max_epochs")
            budget = None
        if total is None and not budget:
            raise ValueError("scheduler=cosine needs an end: set trainer.max_epochs, trainer.max_steps or "
                             "trainer.max_time (or use training.scheduler=plateau)")
        warm = max(min(hp["warmup_steps"], total // 10 if total else hp["warmup_steps"]), 1)
        sched = WarmupCosine(opt, warmup=warm, total=total, budget=budget, min_lr_ratio=hp["min_lr_ratio"],
                             clock=(lambda: timer.time_elapsed("train")) if budget else None)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        with torch.enable_grad():
            out = self.eval_potential(batch, compute_forces=True, compute_stress=bool(batch.pbc.all()))
        return {k: v.detach() for k, v in out.items() if k != keys.VIRIAL}
