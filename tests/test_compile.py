"""``Potential(compile=True)``: compiled energy, forces and stress equal the eager ones (float64, every family), the
fallback when the compiler fails, training steps stay eager, and the option travels through model files.

The compiled runs here use the ``aot_eager`` backend (``POTENTIALS_COMPILE_BACKEND``): Dynamo captures the
model's graph and AOTAutograd builds its backward pass, the pass forces and stress come from, as with inductor,
without generating code (minutes on a shared CPU); benchmarks/compile_bench.py measures inductor.
"""

from __future__ import annotations

import logging

import ase.build
import numpy as np
import pytest
import torch
from hydra.utils import get_class
from torch_geometric.data import Batch

from potentials.graph import AtomicGraph
from potentials.potential import Potential
from tests.model_zoo import CONFIGS, MODELS

CUTOFF = 4.0
#: the contract suite's small models made smaller still (one layer, lmax 1, the default grids): the compile time
#: grows with the number of operations traced
SMALL = {"egnn": {**CONFIGS["egnn"], "num_layers": 1},
         "facet": {**CONFIGS["facet"], "lmax": 1, "num_layers": 1},
         "equiformer_v2": {**{k: v for k, v in CONFIGS["equiformer_v2"].items() if "grid" not in k}, "lmax": 1,
                           "num_layers": 1}}


@pytest.fixture(autouse=True)
def quick_backend(monkeypatch):
    monkeypatch.setenv("POTENTIALS_COMPILE_BACKEND", "aot_eager")


def _potential(name: str) -> Potential:
    torch.manual_seed(0)
    kwargs = {**SMALL[name], "cutoff": CUTOFF}
    model = get_class(kwargs.pop("_target_"))(**kwargs)
    return Potential(model, CUTOFF, atomic_energies={29: -1.2, 13: -3.1}, scale=1.7,
                     shift=0.3).double().eval()


def _cell(repeat=(1, 1, 1), seed: int = 0) -> Batch:
    """A small triclinic CuAl cell, rattled: periodic, so forces and stress."""
    rng = np.random.default_rng(seed)
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True).repeat(repeat)
    atoms.numbers[1::3] = 13
    atoms.set_cell(atoms.cell.array + rng.normal(0, 0.1, (3, 3)), scale_atoms=True)
    atoms.positions += rng.normal(0, 0.1, atoms.positions.shape)
    return Batch.from_data_list([AtomicGraph.from_atoms(atoms, CUTOFF, dtype=torch.float64)])


def _assert_same(out: dict, ref: dict) -> None:
    for key in ("energy", "forces", "stress", "virial"):
        np.testing.assert_allclose(out[key].detach().numpy(), ref[key].detach().numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=key)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_compiled_equals_eager(name, caplog):
    """Energy, forces and stress of the compiled model equal the eager ones, on two cell sizes (one compile with
    dynamic shapes), and the weights keep requiring gradients afterwards."""
    potential = _potential(name)
    flags = [p.requires_grad for p in potential.parameters()]
    small, large = _cell(), _cell((2, 1, 1), seed=1)
    ref_small, ref_large = potential(small), potential(large)
    assert np.abs(ref_small["stress"].detach().numpy()).max() > 1e-6  # the comparison is not vacuous
    assert np.abs(ref_small["forces"].detach().numpy()).max() > 1e-4
    potential.compiled = True
    with caplog.at_level(logging.INFO, logger="potentials.potential"):
        out_small, out_large = potential(small), potential(large)
    assert potential.compiled, caplog.text  # no fallback: the family compiles
    assert "compiled in" in caplog.text  # the compile time is logged
    _assert_same(out_small, ref_small)
    _assert_same(out_large, ref_large)
    assert [p.requires_grad for p in potential.parameters()] == flags


def test_compile_failure_falls_back_with_a_warning(monkeypatch, caplog):
    """A compiler error leaves a warning naming the model and the eager result, and compiling switched off."""
    def broken(gm, example_inputs):
        raise RuntimeError("no code generator for this graph")

    monkeypatch.setattr("potentials.potential.compile_backend", lambda: broken)
    potential = _potential("egnn")
    flags = [p.requires_grad for p in potential.parameters()]
    batch = _cell()
    ref = potential(batch)
    potential.compiled = True
    with caplog.at_level(logging.WARNING, logger="potentials.potential"):
        out = potential(batch)
    assert "torch.compile failed for EGNN" in caplog.text and "no code generator" in caplog.text
    assert potential.compiled is False
    _assert_same(out, ref)
    assert [p.requires_grad for p in potential.parameters()] == flags


def test_training_steps_stay_eager_and_give_parameter_gradients():
    """create_graph=True (a force loss) runs the eager model: the weights' gradients of a force and stress loss are
    those of a potential without compile."""
    def gradients(compiled: bool) -> list:
        potential = _potential("egnn")
        potential.compiled = compiled
        potential.train()
        out = potential(_cell())
        (out["forces"].pow(2).sum() + out["stress"].pow(2).sum()).backward()
        assert potential._compiled_model is None  # never compiled
        return [p.grad for p in potential.model.parameters()]

    compiled, eager = gradients(True), gradients(False)
    assert any(g is not None and float(g.abs().max()) > 0 for g in compiled)
    for a, b in zip(compiled, eager, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_is_saved_and_overridden_on_load(tmp_path):
    from potentials.export import load, save
    potential = _potential("egnn")
    potential.compiled = True
    path = save(potential, tmp_path / "model.pt", {**SMALL["egnn"], "cutoff": CUTOFF})
    assert load(path).compiled is True
    assert load(path, compile=False).compiled is False
    payload = torch.load(path, weights_only=True)
    del payload["runtime"]["compile"]  # a file written before the option: not compiled
    torch.save(payload, tmp_path / "old.pt")
    assert load(tmp_path / "old.pt").compiled is False


def test_compile_must_be_a_bool():
    from potentials.errors import PotentialsInputError

    with pytest.raises(PotentialsInputError, match="compile must be true or false"):
        Potential(MODELS["egnn"](CUTOFF), CUTOFF, compile="yes")


def test_training_with_compile_and_tf32_on_cpu(tmp_path, data_root, caplog):
    """compile=true trains (eager steps), validates and tests compiled, and writes runtime.compile; tf32=true on a
    CPU warns and leaves the flags alone."""
    from potentials.accel.precision import tf32_enabled
    from potentials.training.run import run
    from tests.train_config import train_config

    cfg = train_config(tmp_path / "run", data_root, "logger=csv", "compile=true", "tf32=true", "model.channels=8",
                       "model.num_layers=1", "data.source.n_structures=24", "data.batch_size=4", "data.split.val=4",
                       "data.split.test=4", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                       "figures=false", "demo_relax=false")
    with caplog.at_level(logging.INFO):
        summary = run(cfg)
    assert "torch.compile: EGNN compiled in" in caplog.text
    assert "tf32 applies to CUDA devices only" in caplog.text and not tf32_enabled()
    assert np.isfinite(summary["test"]["test/force_mae"])
    assert torch.load(summary["model"], weights_only=True)["runtime"]["compile"] is True
