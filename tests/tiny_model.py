"""Small exported models for the tests of the command-line tools (evaluate, md, relax).

``cu_model`` fits a tiny EGNN to EMT Cu frames for a few seconds, so that it has a sensible minimum near fcc Cu
(relaxations converge, MD is stable); ``random_model`` exports untrained weights for any elements (enough for
checks that do not need accuracy). Both are written with :func:`potentials.export.save`, as training does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from ase.data import atomic_numbers
from torch_geometric.data import Batch

from potentials.datasets import emt
from potentials.export import save
from potentials.graph import AtomicGraph
from potentials.models.egnn import EGNN
from potentials.potential import Potential
from potentials.training.loss import PotentialLoss

CUTOFF = 4.5
MODEL_CONFIG = {"_target_": "potentials.models.egnn.EGNN", "cutoff": CUTOFF, "avg_num_neighbors": 30.0,
                "channels": 16, "num_layers": 2, "num_basis": 6, "envelope_p": 6}
_CACHE: dict[str, Path] = {}


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: these models are tiny, and two workers sharing two cores oversubscribe otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model() -> EGNN:
    return EGNN(**{k: v for k, v in MODEL_CONFIG.items() if k != "_target_"})


def cu_model(folder: Path, steps: int = 150) -> Path:
    """A tiny EGNN fitted to 16 EMT Cu structures, saved as ``folder/cu.pt`` (once per test process)."""
    if "cu" in _CACHE:
        return _CACHE["cu"]
    torch.manual_seed(0)
    frames = emt.generate(seed=5, n_structures=16, elements=("Cu",))
    with single_thread():
        potential = fit_cu(_model(), frames, steps)
    _CACHE["cu"] = save(potential, Path(folder) / "cu.pt", MODEL_CONFIG)
    return _CACHE["cu"]


def fit_cu(model, frames, steps: int) -> Potential:
    """``model`` wrapped as a Cu potential and fitted to the EMT ``frames`` by ``steps`` full-batch Adam steps on
    energies and forces; returned in eval mode."""
    batch = Batch.from_data_list([AtomicGraph.from_atoms(a, CUTOFF) for a in frames])
    e_ref = float((batch.energy / batch.num_atoms).mean())
    potential = Potential(model, CUTOFF, {29: e_ref}, scale=0.5)
    loss_fn = PotentialLoss(energy_weight=1.0, forces_weight=10.0, stress_weight=0.0)
    opt = torch.optim.Adam(potential.parameters(), lr=1e-2)
    potential.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(potential(batch, compute_stress=False), batch)["total"].backward()
        opt.step()
    return potential.eval()


def random_model(path: Path, symbols: list[str], seed: int = 0) -> Path:
    """Untrained EGNN weights for ``symbols`` (reference energy −1 eV each), saved to ``path``."""
    torch.manual_seed(seed)
    potential = Potential(_model(), CUTOFF, {atomic_numbers[s]: -1.0 for s in symbols}, scale=0.3)
    return save(potential, path, MODEL_CONFIG)
