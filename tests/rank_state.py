"""A Lightning callback for multi-process tests: every process saves its module's weights when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankState(L.Callback):
    """Writes ``<folder>/rank<global rank>.pt``: the LightningModule's state dict (weights and EMA) on that process.

    Args:
        folder: where the files go.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")
