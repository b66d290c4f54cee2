"""Several datasets in one run (``data=mix``): training batches drawn by weight, metrics per dataset and pooled.

Each dataset of the mix is any data config (an adapter or a graph store) with its own splits and a sampling
``weight``. Training draws structures from the pooled training splits:

* an **epoch** is ``ceil(epoch_size / global batch)`` global batches, all full, where ``epoch_size`` defaults to
  the number of training structures of all datasets together and the global batch is ``batch_size × processes``;
* every structure of an epoch comes from dataset ``k`` with probability ``weight_k / Σ weight`` (independently
  for each position), and within a dataset the structures are taken in a fresh random order, without repeats
  until all of its structures have been used (then a new order starts): a dataset with a large weight and few
  structures is cycled several times per epoch, a large one with a small weight sees part of itself;
* the draw is a function of ``seed`` and the epoch only, cut into global batches exactly as
  :mod:`potentials.datasets.sampler` does (process ``rank`` takes positions ``rank, rank + W, …`` of each), so
  ``W`` processes with ``batch_size = B / W`` step through the batches of one process with ``B``, and a run resumed
  mid-epoch continues with the next batch of the same draw.

Statistics (reference energies, force scale, neighbour count) are those of the pooled training splits, with the
reference energies a **weighted** least-squares fit: each training structure of dataset ``k`` counts
``(weight_k / Σ weight) / n_k`` (``n_k`` its training structures; :meth:`MixDataModule.fit_weights`), so the fit
sees the datasets in the proportion training draws them, not in proportion to their sizes. The reference energies
a fine-tuning run refits (``init_from=`` with ``data=mix``) use the same weights. Validation
and test run one loader per dataset; :class:`~potentials.training.module.PotentialModule` logs
``val/<name>/<metric>`` for each and ``val/<metric>`` pooled over all (ratios of sums over every structure).

With ``per_dataset_references``, each dataset ``k`` also gets its own reference-energy table E0_k[z], fitted on its
own training split (:meth:`MixDataModule.reference_tables`), for datasets whose labels disagree on absolute
energies (different DFT settings). Every structure then carries ``dataset_id`` (its dataset's position in the
mix), which :class:`~potentials.training.module.PotentialModule` uses to train and score it against E0_k.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data.distributed import DistributedSampler

from potentials.datasets.collate import collate_graphs
from potentials.datasets.sampler import ResumableDataLoader, make_loader, world
from potentials.datasets.splits import SPLITS
from potentials.datasets.stats import DatasetStats, compute_stats
from potentials.errors import PotentialsInputError

log = logging.getLogger(__name__)

#: Keys of a mix entry that belong to the mix, not to the dataset's own config.
_MIX_KEYS = ("weight",)


class ConcatSplit(Sequence):
    """The splits of several datasets end to end: index ``offsets[k] + i`` is item ``i`` of part ``k``."""

    def __init__(self, parts: Sequence[Sequence]) -> None:
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} structures")
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[k][index - self.offsets[k]]

    def __iter__(self) -> Iterator:
        for part in self.parts:
            yield from part


class TaggedSplit(Sequence):
    """A split whose structures carry ``dataset_id`` (a one-element tensor ``[k]``): shallow copies, so the
    underlying split (an in-memory list shared with the pooled splits) is left as it is."""

    def __init__(self, part: Sequence, index: int) -> None:
        self.part, self.index = part, int(index)

    def __len__(self) -> int:
        return len(self.part)

    def _tag(self, graph):
        graph = copy.copy(graph)
        graph.dataset_id = torch.tensor([self.index], dtype=torch.long)
        return graph

    def __getitem__(self, index: int):
        return self._tag(self.part[index])

    def __iter__(self) -> Iterator:
        for graph in self.part:
            yield self._tag(graph)


class WeightedGlobalBatchSampler(DistributedSampler):
    """Indices into a :class:`ConcatSplit` of one process's share of every weighted global batch.

    Args:
        sizes: structures per dataset (the parts of the ConcatSplit), all positive.
        weights: sampling weight per dataset, all positive (normalised here).
        batch_size: structures per batch on one process.
        epoch_size: structures per epoch over all processes (rounded up to whole global batches).
        num_replicas: number of processes (world size).
        rank: this process's global rank.
        seed: base seed of the draw.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int, epoch_size: int,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(range(sum(sizes)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if batch_size < 1 or epoch_size < 1:
            raise ValueError(f"batch_size and epoch_size must be at least 1, got {batch_size} and {epoch_size}")
        if len(sizes) != len(weights) or min(sizes) < 1 or min(weights) <= 0:
            raise ValueError(f"need a positive size and weight per dataset, got sizes {sizes}, weights {weights}")
        self.sizes = [int(s) for s in sizes]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        self.batch_size = int(batch_size)
        self.epoch_size = int(epoch_size)
        self.start_batch = 0  # batches of the current epoch to skip (resuming mid-epoch)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def num_batches(self) -> int:
        """Global batches per epoch, the same on every process."""
        return math.ceil(self.epoch_size / self.global_batch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def global_order(self) -> list[int]:
        """The epoch's draw: ``num_batches × global batch`` indices, identical on every process."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_batches * self.global_batch
        choice = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        order = torch.empty(total, dtype=torch.int64)
        for k, size in enumerate(self.sizes):
            slots = torch.nonzero(choice == k).flatten()
            cycles = math.ceil(len(slots) / size)
            stream = [torch.randperm(size, generator=generator) for _ in range(cycles)]
            if stream:
                order[slots] = torch.cat(stream)[:len(slots)] + self.offsets[k]
        return order.tolist()

    def dataset_of(self, indices: Sequence[int]) -> list[int]:
        """The dataset (part number) of each index."""
        return [bisect.bisect_right(self.offsets, i) - 1 for i in indices]

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        size = self.global_batch
        indices: list[int] = []
        for start in range(self.start_batch * size, len(order), size):
            indices.extend(order[start:start + size][self.rank::self.num_replicas])
        return iter(indices)


def _entry_options(name: str, entry: Any) -> tuple[Any, float]:
    """(the dataset's own config, its weight) from one entry of ``datasets``."""
    if not isinstance(entry, (Mapping, DictConfig)):
        raise PotentialsInputError(f"dataset {name!r} must be a data config (a mapping with a _target_), "
                                   f"got {entry!r}")
    options = OmegaConf.create(OmegaConf.to_container(entry, resolve=True)) if isinstance(entry, DictConfig) \
        else OmegaConf.create(dict(entry))
    weight = options.get("weight", 1.0)
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight) or weight <= 0:
        raise PotentialsInputError(f"dataset {name!r} has weight {options.get('weight')!r}; every weight "
                                   "must be a positive number (the probability of drawing from a dataset is its "
                                   "weight over the sum of all weights)")
    for key in _MIX_KEYS:
        options.pop(key, None)
    if "_target_" not in options:
        raise PotentialsInputError(f"dataset {name!r} has no _target_; give a data config, e.g. "
                                   f"+data@data.datasets.{name}=ase data.datasets.{name}.path=FILE")
    return options, weight


class MixDataModule(L.LightningDataModule):
    """Several datasets, each with its own splits, trained on together (see the module docstring).

    Args:
        datasets: name → a data config (``_target_`` an :class:`AtomsDataModule` config: any adapter or a store)
            plus ``weight`` (default 1). Each dataset keeps its own ``split``; its ``batch_size`` and
            ``num_workers`` are replaced by the mix's.
        batch_size: structures per training batch on one process.
        eval_batch_size: structures per validation/test batch (defaults to ``batch_size``).
        epoch_size: structures per training epoch over all processes; None: all training structures of all
            datasets together.
        monitor_dataset: a dataset name: ``best.ckpt`` follows ``val/<name>/<metric>`` (the metric of
            ``training.monitor``) instead of the pooled ``val/<metric>``.
        num_workers: DataLoader worker processes.
        seed: seed of the draw.
        name: name of the mix, for messages and the exported model.
        per_dataset_references: fit a reference-energy table per dataset (on its own training split; elements it
            lacks take the pooled fit's value) and train and score each structure against its dataset's table
            (batches carry ``dataset_id``); the backbone is shared. False: one pooled table, as for one dataset.
        export_references: the dataset whose table the exported model carries (with ``per_dataset_references``);
            None: ``monitor_dataset``, else the first dataset.
        dtype, cutoff: accepted for symmetry with the single-dataset configs (each dataset's own are used).
    """

    def __init__(self, datasets: Mapping[str, Any] | None = None, batch_size: int = 8,
                 eval_batch_size: int | None = None, epoch_size: int | None = None,
                 monitor_dataset: str | None = None, num_workers: int = 0, seed: int = 0, name: str = "mix",
                 dtype: str | None = None, cutoff: float | None = None, per_dataset_references: bool = False,
                 export_references: str | None = None) -> None:
        super().__init__()
        datasets = dict(datasets or {})
        if not datasets:
            raise PotentialsInputError(
                "a mix (data=mix) needs at least one dataset: add each with +data@data.datasets.NAME=CONFIG (CONFIG "
                "any data config: ase, emt, md17, store, ...), its options as data.datasets.NAME.path=... and its "
                "weight as +data.datasets.NAME.weight=...; or list them under datasets: in a config file "
                "(docs/data_mix.md)")
        self.weights: dict[str, float] = {}
        self.modules: dict[str, Any] = {}
        for ds_name, entry in datasets.items():
            options, weight = _entry_options(ds_name, entry)
            options.batch_size = int(batch_size)
            options.eval_batch_size = int(eval_batch_size or batch_size)
            options.num_workers = int(num_workers)
            options.name = ds_name
            self.modules[ds_name] = instantiate(options)
            self.weights[ds_name] = weight
        self.names = list(self.modules)
        if monitor_dataset is not None and monitor_dataset not in self.modules:
            raise PotentialsInputError(f"data.monitor_dataset={monitor_dataset!r} is not a dataset of the mix; "
                                       f"the datasets are {', '.join(self.names)}")
        if epoch_size is not None and int(epoch_size) < 1:
            raise PotentialsInputError(f"data.epoch_size={epoch_size}: an epoch needs at least one structure (null: "
                                       "the training structures of all datasets together)")
        if export_references is not None and export_references not in self.modules:
            raise PotentialsInputError(f"data.export_references={export_references!r} is not a dataset of the mix; "
                                       f"the datasets are {', '.join(self.names)}")
        if export_references is not None and not per_dataset_references:
            raise PotentialsInputError(f"data.export_references={export_references!r} needs "
                                       "data.per_dataset_references=true (without it the mix has one pooled "
                                       "reference-energy table)")
        self.monitor_dataset = monitor_dataset
        self.per_dataset_references = bool(per_dataset_references)
        #: the dataset whose reference energies the exported model carries (per_dataset_references only)
        self.export_references = export_references or monitor_dataset or self.names[0]
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.epoch_size = None if epoch_size is None else int(epoch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.name = name
        self.splits: dict[str, Sequence] = {}
        #: the datasets behind each validation/test loader, in loader order (datasets with an empty split have none)
        self.loader_names: dict[str, list[str]] = {}
        self._stats: DatasetStats | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict[str, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for ds_name, dm in self.modules.items():
            try:
                dm.setup(stage)
            except ValueError as err:  # how the adapters and the datamodule report unusable input (input errors too)
                named = f"dataset {ds_name!r}" in str(err)
                raise PotentialsInputError(f"data=mix{'' if named else f', dataset {ds_name!r}'}: {err}") from err
        for split in SPLITS:
            parts = [self.modules[n].splits[split] for n in self.names]
            # in-memory parts stay a list (the label report of the training pipeline reads lists)
            self.splits[split] = list(itertools.chain(*parts)) if all(isinstance(p, list) for p in parts) \
                else ConcatSplit(parts)
            self.loader_names[split] = [n for n in self.names if len(self.modules[n].splits[split])]
        if self.epoch_size is None:
            self.epoch_size = len(self.splits["train"])
        log.info("mix of %d datasets: %s", len(self.names), ", ".join(
            f"{n} (weight {self.weights[n]:g}, train {len(self.modules[n].splits['train'])})" for n in self.names))

    @property
    def stats(self) -> DatasetStats:
        """Statistics of the pooled training splits (computed once); reference energies fitted with
        :meth:`fit_weights`."""
        if self._stats is None:
            self.setup()
            self._stats = compute_stats(iter(self.splits["train"]), weights=self.fit_weights())
        return self._stats

    def fit_weights(self) -> list[float]:
        """One weight per structure of ``splits["train"]`` (in its order) for least-squares fits over it: a
        structure of dataset ``k`` gets ``(weight_k / Σ weight) · N / n_k``, ``n_k`` the dataset's training
        structures and ``N`` all of them, so the weights average 1 and each dataset weighs in the fit as much as
        training draws it. Datasets without training structures take no part in the normalisation."""
        self.setup()
        sizes = {n: len(self.modules[n].splits["train"]) for n in self.names}
        total_weight = sum(self.weights[n] for n in self.names if sizes[n])
        total = sum(sizes.values())
        out: list[float] = []
        for n in self.names:
            if sizes[n]:
                out.extend([self.weights[n] / total_weight * total / sizes[n]] * sizes[n])
        return out

    def reference_tables(self, pooled: Mapping[int, float], baseline=None) -> dict[str, dict[int, float]]:
        """Per dataset (``per_dataset_references``), E0_k[z] fitted on its own training split, over every element
        of ``pooled`` (the pooled fit, whose values stand in for elements dataset ``k`` lacks).

        ``baseline``: as for :func:`~potentials.datasets.stats.compute_stats` (the physics terms).
        """
        self.setup()
        tables = {}
        for ds_name in self.names:
            own = compute_stats(iter(self.modules[ds_name].splits["train"]), baseline=baseline).atomic_energies
            tables[ds_name] = {int(z): float(own.get(int(z), e)) for z, e in pooled.items()}
        return tables

    def _sampler(self) -> WeightedGlobalBatchSampler:
        num_replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None \
            else world()
        sizes = [len(self.modules[n].splits["train"]) for n in self.names]
        return WeightedGlobalBatchSampler(sizes, [self.weights[n] for n in self.names], self.batch_size,
                                          self.epoch_size, num_replicas=num_replicas, rank=rank, seed=self.seed)

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        parts = ConcatSplit([self._part(n, "train") for n in self.names])
        loader = ResumableDataLoader(parts, self._sampler(), num_workers=self.num_workers,
                                     persistent_workers=self.num_workers > 0)
        loader.collate_fn = collate_graphs
        state, self._train_loader_state = self._train_loader_state, None
        if state:
            loader.load_state_dict(state)  # resuming mid-epoch: skip the batches already trained on
        self._train_loader = loader
        return loader

    def _part(self, ds_name: str, split: str) -> Sequence:
        """Dataset ``ds_name``'s ``split``, its structures tagged with ``dataset_id`` under
        ``per_dataset_references``."""
        part = self.modules[ds_name].splits[split]
        return TaggedSplit(part, self.names.index(ds_name)) if self.per_dataset_references else part

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position in its epoch; Lightning keeps it in checkpoints."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_loader_state = state.get("train_loader")

    def _eval_loaders(self, split: str) -> list:
        self.setup()
        loaders = []
        for ds_name in self.loader_names[split]:
            loader = make_loader(self._part(ds_name, split), self.eval_batch_size, shuffle=False,
                                 seed=self.seed, num_workers=self.num_workers, trainer=self.trainer)
            loader.collate_fn = collate_graphs
            loaders.append(loader)
        return loaders

    def val_dataloader(self) -> list:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list:
        return self._eval_loaders("test")
