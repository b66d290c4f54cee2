"""EGNN's coordinate updates (Satorras et al. 2021, eq. 4) beyond the family contract (tests/test_model_contract.py
runs the whole contract on ``egnn_coords`` too): an edge that leaves the neighbour list changes the energy and the
forces continuously, zero pushes give back the invariant model, and files written before the option load as the
invariant model."""

from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from potentials.export import load, save
from potentials.graph import AtomicGraph
from potentials.models.egnn import EGNN
from potentials.potential import Potential
from tests.model_zoo import MODELS, config

CUTOFF = 4.0


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _potential(name: str) -> Potential:
    torch.manual_seed(0)
    return Potential(MODELS[name](CUTOFF), CUTOFF, atomic_energies={29: -1.0, 13: -2.0}, scale=1.7).double().eval()


def _evaluate(potential: Potential, atoms: ase.Atoms, drop: tuple[int, int] | None = None
              ) -> tuple[float, np.ndarray]:
    """Energy and forces; ``drop``: leave the edges between these two atoms out of the neighbour list."""
    graph = AtomicGraph.from_atoms(atoms, CUTOFF, dtype=torch.float64)
    if drop is not None:
        pair = set(drop)
        keep = torch.tensor([{int(j), int(i)} != pair for j, i in graph.edge_index.T])
        assert (~keep).sum() == 2
        graph.edge_index, graph.cell_offsets = graph.edge_index[:, keep], graph.cell_offsets[keep]
    out = potential(Batch.from_data_list([graph]), compute_forces=True, compute_stress=False)
    return float(out["energy"][0].detach()), out["forces"].detach().numpy()


def _crossing(r: float) -> ase.Atoms:
    """Four atoms; the first and last are ``r`` apart, every other pair 2.1–3.6 Å."""
    y = np.sqrt(r**2 - 9.0)
    return ase.Atoms("CuAlCuAl", positions=[[0, 0, 0], [3.0, 0, 0], [1.5, 1.5, 1.0], [3.0, y, 0]])


@pytest.mark.parametrize("name", ["egnn", "egnn_coords"])
def test_an_edge_leaving_the_neighbour_list_changes_energy_and_forces_continuously(name):
    """At a distance just inside the cutoff, the energy and forces with the pair's edges equal those without them
    (as just outside) up to terms that vanish with the distance δ to the cutoff: as δ³ and δ² (the envelope's value
    and first two derivatives vanish there).  A coordinate push or a later message without the envelope of the
    input length would leave a step of the size of δ⁰."""
    potential = _potential(name)
    steps = []
    for delta in (1e-1, 1e-2, 1e-3):
        atoms = _crossing(CUTOFF - delta)
        with_pair, without = _evaluate(potential, atoms), _evaluate(potential, atoms, drop=(0, 3))
        steps.append((abs(with_pair[0] - without[0]), np.abs(with_pair[1] - without[1]).max()))
    (e1, f1), (e2, f2), (e3, f3) = steps
    assert e1 > 1e-7 and f1 > 1e-6  # the model does see the pair inside the cutoff
    assert e2 < e1 / 300 and e3 < max(e2 / 300, 1e-14)
    assert f2 < f1 / 30 and f3 < max(f2 / 30, 1e-12)


def test_zero_pushes_give_the_invariant_model_and_pushes_change_it():
    moving = _potential("egnn_coords")
    fixed = Potential(EGNN(**{k: v for k, v in config("egnn_coords", CUTOFF).items()
                              if k not in ("_target_", "coord_updates")}), CUTOFF,
                      atomic_energies={29: -1.0, 13: -2.0}, scale=1.7).double().eval()
    missing, unexpected = fixed.load_state_dict(moving.state_dict(), strict=False)
    assert not missing and unexpected and all(".coord_mlp." in k for k in unexpected)
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[[1, 3]] = 13
    atoms.rattle(0.1, seed=0)
    e_moving, f_moving = _evaluate(moving, atoms)
    e_fixed, f_fixed = _evaluate(fixed, atoms)
    assert abs(e_moving - e_fixed) > 1e-4 and np.abs(f_moving - f_fixed).max() > 1e-5
    with torch.no_grad():
        for layer in moving.model.layers:
            if layer.coord_mlp is not None:
                layer.coord_mlp[-1].weight.zero_()
    e_zero, f_zero = _evaluate(moving, atoms)
    assert e_zero == pytest.approx(e_fixed, rel=1e-12)
    np.testing.assert_allclose(f_zero, f_fixed, atol=1e-12)


def test_files_written_before_the_option_load_as_the_invariant_model(tmp_path):
    potential = _potential("egnn")
    assert EGNN.upgrade_config({"cutoff": 4.0}, 3) == {"cutoff": 4.0, "coord_updates": False}
    assert EGNN.upgrade_config({"cutoff": 4.0, "coord_updates": True}, 3)["coord_updates"] is True
    path = save(potential, tmp_path / "model.pt", config("egnn", CUTOFF))
    payload = torch.load(path, weights_only=True)
    assert payload["model"]["config"]["coord_updates"] is False  # every new file records the choice
    del payload["model"]["config"]["coord_updates"]  # as an older version wrote it
    torch.save(payload, tmp_path / "old.pt")
    old = load(tmp_path / "old.pt", dtype="float64")
    assert old.model.coord_updates is False and old.metadata["model_config"]["coord_updates"] is False
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.numbers[:] = 29
    assert _evaluate(old, atoms)[0] == _evaluate(potential, atoms)[0]
    moving = _potential("egnn_coords")
    new = load(save(moving, tmp_path / "new.pt", config("egnn_coords", CUTOFF)), dtype="float64")
    assert new.model.coord_updates is True and _evaluate(new, atoms)[0] == _evaluate(moving, atoms)[0]
