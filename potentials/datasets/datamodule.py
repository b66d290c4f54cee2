"""AtomsDataModule: any adapter's ``ase.Atoms`` → AtomicGraphs → reproducible splits → PyG batches.

The graphs live in memory (``source``: an adapter) or on disk (``dataset``: a
:class:`~potentials.datasets.store.StoreDataset` over a graph store built by ``potentials preprocess``); splits,
batching and the statistics interface are the same for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import ase
import lightning as L
import torch
from torch_geometric.loader import DataLoader

from potentials.datasets.collate import collate_graphs
from potentials.datasets.sampler import make_loader
from potentials.datasets.splits import SPLITS, make_splits
from potentials.datasets.stats import DatasetStats, compute_stats
from potentials.errors import PotentialsInputError
from potentials.graph import AtomicGraph

log = logging.getLogger(__name__)


def _where(atoms: ase.Atoms, k: int) -> str:
    info = atoms.info
    return f"{info.get('source', 'record')} frame {info.get('frame', k)}"


class AtomsDataModule(L.LightningDataModule):
    """Dataset of graphs built once from an adapter (in memory) or read from a graph store (on disk).

    Args:
        source: a callable returning an iterable of labelled ``ase.Atoms`` (an adapter's ``read`` with its options
            bound; in Hydra configs a ``_partial_: true`` target). Give either ``source`` or ``dataset``.
        dataset: a map-style dataset of AtomicGraphs with ``subset(indices)``, ``groups(info_key)`` and
            ``cached_stats()`` (a :class:`~potentials.datasets.store.StoreDataset`); splits become subsets of it
            and nothing is loaded into memory.
        cutoff: neighbour radius, Å (with ``dataset``: defaults to the dataset's cutoff).
        split: keyword arguments of :func:`potentials.datasets.splits.make_splits` (train/val/test amounts, seed,
            index_files) plus ``group_by``: an ``atoms.info`` key whose values keep groups within one split.
        batch_size: structures per training batch.
        eval_batch_size: structures per validation/test batch (defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        dtype: floating dtype of the graphs (``float32`` or ``float64``).
        seed: seed of the training shuffle.
        name: dataset name, for messages and the exported model.
        path: the data file or store the config's ``source``/``dataset`` reads (kept for reference only).
    """

    def __init__(
        self,
        source: Callable[[], Iterable[ase.Atoms]] | None = None,
        cutoff: float | None = None,
        split: dict[str, Any] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        dtype: str = "float32",
        seed: int = 0,
        name: str = "data",
        dataset: Any = None,
        path: str | None = None,
    ) -> None:
        super().__init__()
        if (source is None) == (dataset is None):
            raise ValueError(f"dataset {name!r}: give either source (an adapter) or dataset (a graph store), not "
                             f"{'both' if source is not None else 'neither'}")
        if cutoff is None and dataset is None:
            raise ValueError(f"dataset {name!r}: cutoff (Å) is required to build graphs from an adapter")
        self.source = source
        self.dataset = dataset
        self.cutoff = float(cutoff if cutoff is not None else dataset.cutoff)
        self.split_options = dict(split or {})
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.seed = int(seed)
        self.name = name
        self.path = path
        self.graphs: list[AtomicGraph] | None = None
        self.splits: dict[str, list[AtomicGraph]] = {}
        self.indices: dict[str, Any] = {}
        self._stats: DatasetStats | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.graphs is not None:
            return
        if self.dataset is not None:
            self._setup_dataset()
            return
        graphs, groups = [], []
        options = dict(self.split_options)
        group_by = options.pop("group_by", None)
        for k, atoms in enumerate(self.source()):
            where = _where(atoms, k)
            try:
                graph = AtomicGraph.from_atoms(atoms, self.cutoff, dtype=self.dtype)
            except ValueError as err:  # e.g. a degenerate cell: say which frame
                raise PotentialsInputError(f"{where}: {err}") from err
            graph.validate(where)
            graph.check_distances(where)
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

    def _setup_dataset(self) -> None:
        """Splits of an on-disk dataset: index arrays and lazy subsets, nothing read but group keys."""
        options = dict(self.split_options)
        group_by = options.pop("group_by", None)
        n = len(self.dataset)
        if n == 0:
            raise ValueError(f"dataset {self.name!r} is empty")
        groups = self.dataset.groups(group_by) if group_by is not None else None
        self.graphs = self.dataset
        self.indices = make_splits(n, groups=groups, **options)
        self.splits = {name: self.dataset.subset(self.indices[name]) for name in SPLITS}
        if not len(self.splits["train"]):
            raise ValueError(f"dataset {self.name!r}: the train split is empty ({n} structures)")
        log.info("dataset %s: %s structures", self.name, {k: len(v) for k, v in self.splits.items()})

    @property
    def stats(self) -> DatasetStats:
        """Statistics of the training split (computed once)."""
        if self._stats is None:
            self.setup()
            train = self.splits["train"]
            self._stats = train.cached_stats() if hasattr(train, "cached_stats") else compute_stats(train)
        return self._stats

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        # sharded across the trainer's processes in global batches; resumable mid-epoch (see sampler.py)
        loader = make_loader(self.splits[name], self.batch_size if name == "train" else self.eval_batch_size,
                             shuffle=shuffle, seed=self.seed, num_workers=self.num_workers, trainer=self.trainer)
        loader.collate_fn = collate_graphs  # batches leave worker processes as one byte string (collate.py)
        return loader

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", shuffle=True)
        if self.trainer is not None:  # the epoch the trainer counts, whatever sampler epoch Lightning sets (sampler.py)
            loader.epoch_source = lambda: self.trainer.current_epoch
        state, self._train_loader_state = getattr(self, "_train_loader_state", None), None
        if state:
            loader.load_state_dict(state)  # resuming mid-epoch: skip the batches already trained on
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position in its epoch; Lightning keeps it in checkpoints."""
        loader = getattr(self, "_train_loader", None)
        return {"train_loader": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restored from a checkpoint before the loaders exist; applied by :meth:`train_dataloader`."""
        self._train_loader_state = state.get("train_loader")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
