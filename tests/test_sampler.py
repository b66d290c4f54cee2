"""Global batches split across processes: every structure once per epoch, equal batch counts, mid-epoch resume."""

from __future__ import annotations

import ase.build
import pytest
import torch
from ase.calculators.emt import EMT

from potentials.datasets.sampler import GlobalBatchSampler, PaddedSplit, ResumableDataLoader
from potentials.graph import AtomicGraph


def _batches(n: int, batch_size: int, world: int, rank: int, epoch: int = 0, shuffle: bool = True) -> list[list[int]]:
    sampler = GlobalBatchSampler(n, batch_size, num_replicas=world, rank=rank, shuffle=shuffle, seed=7)
    sampler.set_epoch(epoch)
    order = list(sampler)
    assert len(order) == len(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("n", [1, 5, 8, 9, 13, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_structure_once_per_epoch_and_equal_batch_counts(n, world):
    """Uneven sizes included: the ranks' real indices partition 0..n-1; padding only fills empty last batches."""
    b = 2
    per_rank = [_batches(n, b, world, r, epoch=3) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps on every process
    real = sorted(i for batches in per_rank for batch in batches for i in batch if i < n)
    assert real == list(range(n))
    for batches in per_rank:
        assert all(1 <= len(batch) <= b for batch in batches)
        padding = [i for batch in batches for i in batch if i >= n]
        assert len(padding) <= 1 and all(batch == [i] for batch in batches for i in batch if i >= n)


@pytest.mark.parametrize("n", [9, 13])
def test_global_batches_do_not_depend_on_the_number_of_processes(n):
    """Step k of 2 processes with batch B/2 covers the same structures as step k of 1 process with batch B."""
    single = _batches(n, 4, 1, 0, epoch=1)
    double = [_batches(n, 2, 2, r, epoch=1) for r in range(2)]
    for k, batch in enumerate(single):
        union = sorted(i for r in range(2) for i in double[r][k] if i < n)
        assert union == sorted(batch)
    assert _batches(n, 4, 1, 0, epoch=1) != _batches(n, 4, 1, 0, epoch=2)  # reshuffled every epoch
    assert _batches(n, 4, 1, 0, shuffle=False) == [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]


def test_padding_structure_carries_no_labels():
    graph = AtomicGraph.from_atoms(_labelled(), 3.0)
    split = PaddedSplit([graph])
    pad = split[1]
    assert not bool(pad.has_energy) and not bool(pad.has_forces) and not bool(pad.has_stress)
    assert bool(graph.has_energy) and torch.equal(pad.pos, graph.pos)  # the original is untouched


def test_loader_resumes_mid_epoch_with_the_remaining_batches():
    """state_dict after k batches → a fresh loader yields exactly the batches the first had left."""
    graphs = [AtomicGraph.from_atoms(_labelled(seed=i), 3.0) for i in range(7)]
    for i, g in enumerate(graphs):
        g.energy = torch.tensor([float(i)])  # identifies the structure in a batch

    def loader():
        return ResumableDataLoader(graphs, GlobalBatchSampler(len(graphs), 2, shuffle=True, seed=3))

    full = loader()
    full.sampler.set_epoch(2)
    reference = [b.energy.tolist() for b in full]
    first = loader()
    first.sampler.set_epoch(2)
    it = iter(first)
    seen = [next(it).energy.tolist() for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b.energy.tolist() for b in resumed]
    assert seen + rest == reference and len(resumed) == len(reference)
    assert resumed.state_dict() == {"epoch": 2, "batches": len(reference)}  # counts from the resumed position
    resumed.sampler.set_epoch(3)
    assert len(list(resumed)) == len(reference)  # the skip applies to the resumed epoch only


def _labelled(seed: int = 0):
    atoms = ase.build.bulk("Cu", "fcc", a=3.6)
    atoms.rattle(0.01, seed=seed)
    atoms.calc = EMT()
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    return atoms
