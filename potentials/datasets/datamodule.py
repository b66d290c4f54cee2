"""AtomsDataModule: any adapter's ``ase.Atoms`` → AtomicGraphs → reproducible splits → PyG batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import ase
import lightning as L
import torch
from torch_geometric.loader import DataLoader

from potentials.datasets.splits import SPLITS, make_splits
from potentials.datasets.stats import DatasetStats, compute_stats
from potentials.graph import AtomicGraph

log = logging.getLogger(__name__)


def _where(atoms: ase.Atoms, k: int) -> str:
    info = atoms.info
    return f"{info.get('source', 'record')} frame {info.get('frame', k)}"


class AtomsDataModule(L.LightningDataModule):
    """In-memory dataset of graphs built once from an adapter.

    Args:
        source: a callable returning an iterable of labelled ``ase.Atoms`` (an adapter's ``read`` with its options
            bound; in Hydra configs a ``_partial_: true`` target).
        cutoff: neighbour radius, Å.
        split: keyword arguments of :func:`potentials.datasets.splits.make_splits` (train/val/test amounts, seed,
            index_files) plus ``group_by``: an ``atoms.info`` key whose values keep groups within one split.
        batch_size: structures per training batch.
        eval_batch_size: structures per validation/test batch (defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        dtype: floating dtype of the graphs (``float32`` or ``float64``).
        seed: seed of the training shuffle.
    """

    def __init__(
        self,
        source: Callable[[], Iterable[ase.Atoms]],
        cutoff: float,
        split: dict[str, Any] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        dtype: str = "float32",
        seed: int = 0,
        name: str = "data",
    ) -> None:
        super().__init__()
        self.source = source
        self.cutoff = float(cutoff)
        self.split_options = dict(split or {})
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.seed = int(seed)
        self.name = name
        self.graphs: list[AtomicGraph] | None = None
        self.splits: dict[str, list[AtomicGraph]] = {}
        self.indices: dict[str, Any] = {}
        self._stats: DatasetStats | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.graphs is not None:
            return
        graphs, groups = [], []
        options = dict(self.split_options)
        group_by = options.pop("group_by", None)
        for k, atoms in enumerate(self.source()):
            where = _where(atoms, k)
            graph = AtomicGraph.from_atoms(atoms, self.cutoff, dtype=self.dtype)
            graph.validate(where)
            graphs.append(graph)
            if group_by is not None:
                if group_by not in atoms.info:
                    raise ValueError(f"{where}: split.group_by={group_by!r} but atoms.info has no such key")
                groups.append(atoms.info[group_by])
        if not graphs:
            raise ValueError(f"dataset {self.name!r} is empty: the source yielded no structures")
        self.graphs = graphs
        self.indices = make_splits(len(graphs), groups=groups or None, **options)
        self.splits = {name: [graphs[i] for i in self.indices[name]] for name in SPLITS}
        for name in ("train",):
            if not self.splits[name]:
                raise ValueError(f"dataset {self.name!r}: the {name} split is empty ({len(graphs)} structures)")
        log.info("dataset %s: %s structures", self.name, {k: len(v) for k, v in self.splits.items()})

    @property
    def stats(self) -> DatasetStats:
        """Statistics of the training split (computed once)."""
        if self._stats is None:
            self.setup()
            self._stats = compute_stats(self.splits["train"])
        return self._stats

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.splits[name],
            batch_size=self.batch_size if name == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
