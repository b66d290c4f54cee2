"""Batches that are the same whether one process or many train: global batches split across processes.

Under data-parallel training (Lightning's DDP, one process per device) every optimiser step consumes one *global
batch* of ``batch_size × world_size`` structures, each process taking ``batch_size`` of them. The order of the
global batches depends only on the seed and the epoch, never on the number of processes, so a run on W processes
with ``batch_size = B / W`` steps through exactly the batches a single process with ``batch_size = B`` would.

Every structure is used exactly once per epoch on all processes together. When the last global batch holds fewer
structures than there are processes, a process left without one gets a *padding* structure: a copy of a real one
with its label masks (``has_energy``, ``has_forces``, ``has_stress``) switched off, so it adds nothing to the loss
or the metrics while keeping the number of batches equal on all processes (which collective operations need).

The loader is resumable: Lightning stores :meth:`ResumableDataLoader.state_dict` (epoch, batches consumed) in its
checkpoints and a run restarted from a mid-epoch checkpoint continues with the next batch of the same epoch. Under a
trainer the loader takes its epoch from the trainer's epoch counter when an iteration starts, not from the sampler
epoch Lightning sets: after a resume from a checkpoint taken at an epoch's end under ``max_steps``, Lightning sets
samplers one epoch ahead of its own counter (it replays the end of the saved epoch), which would reorder the batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler
from torch_geometric.loader import DataLoader


class PaddedSplit(Sequence):
    """A split plus padding indices: index ``len(graphs) + i`` is a copy of structure ``i`` with no labels.

    Args:
        graphs: the structures (any sequence of AtomicGraphs).
    """

    def __init__(self, graphs: Sequence) -> None:
        self.graphs = graphs

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int):
        n = len(self.graphs)
        if index < n:
            return self.graphs[index]
        graph = self.graphs[index - n].clone()
        for mask in ("has_energy", "has_forces", "has_stress"):
            setattr(graph, mask, torch.zeros_like(getattr(graph, mask)))
        return graph


class GlobalBatchSampler(DistributedSampler):
    """Indices of one process's share of every global batch (see the module docstring).

    Each epoch the ``n`` indices are permuted with a generator seeded by ``seed + epoch`` (or kept in order when
    ``shuffle`` is false) and cut into global batches of ``batch_size × num_replicas`` consecutive positions;
    process ``rank`` takes positions ``rank, rank + num_replicas, …`` of each. Padding indices (≥ n) fill a
    process's last batch when it would otherwise be empty.

    Args:
        n: number of structures in the split.
        batch_size: structures per batch on one process.
        num_replicas: number of processes (world size).
        rank: this process's global rank.
        shuffle: permute every epoch.
        seed: base seed of the permutation.
    """

    def __init__(self, n: int, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.start_batch = 0  # batches of the current epoch to skip (resuming mid-epoch)

    @property
    def num_batches(self) -> int:
        """Batches per epoch, the same on every process."""
        return math.ceil(self.n / (self.batch_size * self.num_replicas))

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size * self.num_replicas)
        last = 0 if rest == 0 else max(len(range(self.rank, rest, self.num_replicas)), 1)
        return full * self.batch_size + last

    def global_order(self) -> list[int]:
        """The epoch's order of all ``n`` indices (identical on every process)."""
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        size = self.batch_size * self.num_replicas
        indices: list[int] = []
        for start in range(self.start_batch * size, self.n, size):
            mine = order[start:start + size][self.rank::self.num_replicas]
            indices.extend(mine if mine else [self.n + order[start]])
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """PyG DataLoader over a :class:`GlobalBatchSampler` that can resume mid-epoch.

    ``state_dict()`` records the epoch and the batches handed out so far; after ``load_state_dict()`` the next
    iteration over that epoch skips those batches (Lightning calls both through its checkpoints). ``len()`` stays
    the full number of batches per epoch, which is what Lightning's progress counters expect.

    Args:
        dataset: the split's structures.
        sampler: its :class:`GlobalBatchSampler`.
        epoch_source: called when an iteration starts, returns the epoch to draw (the trainer's epoch); None: the
            sampler's epoch as last set with ``set_epoch``.
    """

    sampler: GlobalBatchSampler

    def __init__(self, dataset: Sequence, sampler: GlobalBatchSampler,
                 epoch_source: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(PaddedSplit(dataset), batch_size=sampler.batch_size, sampler=sampler, **kwargs)
        self.epoch_source = epoch_source
        self._consumed = 0
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self) -> Iterator:
        if self.epoch_source is not None:
            self.sampler.set_epoch(int(self.epoch_source()))
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == self.sampler.epoch else 0
        self.sampler.start_batch = min(skip, self.sampler.num_batches)
        self._consumed = self.sampler.start_batch
        for batch in super().__iter__():
            self._consumed += 1
            yield batch


def world() -> tuple[int, int]:
    """(world size, global rank) of the initialised torch.distributed group, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def make_loader(graphs: Sequence, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                trainer=None) -> ResumableDataLoader:
    """A loader over ``graphs`` sharded across the processes of ``trainer`` (or of torch.distributed).

    Args:
        graphs: the split's structures.
        batch_size: structures per batch on one process.
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch).
        seed: permutation seed.
        num_workers: DataLoader worker processes.
        trainer: the Lightning Trainer, whose ``world_size`` and ``global_rank`` shard the data.
    """
    num_replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else world()
    sampler = GlobalBatchSampler(len(graphs), batch_size, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                 seed=seed)
    return ResumableDataLoader(graphs, sampler, num_workers=num_workers, persistent_workers=num_workers > 0)
