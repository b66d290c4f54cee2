"""Small steps on one thread under the passive OpenMP wait policy (potentials.accel.threads)."""

from __future__ import annotations

import threading

import ase.build
import pytest
import torch

from potentials.accel import threads
from potentials.graph import AtomicGraph
from potentials.models.base import EnergyModel
from potentials.models.equiformer import EquiformerV2
from potentials.potential import Potential


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class _Probe(torch.autograd.Function):
    """Identity that records the thread count when its forward and its backward run."""

    log: list[tuple[str, int]] = []

    @staticmethod
    def forward(ctx, x):
        _Probe.log.append(("forward", torch.get_num_threads()))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _Probe.log.append(("backward", torch.get_num_threads()))
        return grad


def test_threshold_follows_the_wait_policy_and_the_override(monkeypatch):
    monkeypatch.delenv("POTENTIALS_SERIAL_BELOW", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert threads.serial_threshold() == threads.DEFAULT_SERIAL_BELOW
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert threads.serial_threshold() == threads.DEFAULT_SERIAL_BELOW
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert threads.serial_threshold() == 0
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert threads.serial_threshold() == 0
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "5000")
    assert threads.serial_threshold() == 5000
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "0")
    assert threads.serial_threshold() == 0
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "many")
    with pytest.raises(ValueError, match="POTENTIALS_SERIAL_BELOW must be an integer"):
        threads.serial_threshold()


def test_switches_in_the_forward_pass_and_back_in_reverse_in_the_backward_pass(monkeypatch, two_threads):
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "100")
    _Probe.log = []
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    with threads.small_steps_serial():
        a = _Probe.apply(threads.enter(x))  # 50 values: one thread
        b = _Probe.apply(threads.enter(a * 2.0, 10_000))  # large: the caller's two
        c = _Probe.apply(threads.enter(b + 1.0))  # small again
        d = _Probe.apply(threads.enter(c * 3.0))  # no change: no switch
        (grad,) = torch.autograd.grad(d.sum(), x)
        assert torch.get_num_threads() == 2  # the first switch's backward restored the caller's count
    assert torch.get_num_threads() == 2
    torch.testing.assert_close(grad, torch.full_like(x, 6.0))
    forward = [n for kind, n in _Probe.log if kind == "forward"]
    backward = [n for kind, n in _Probe.log if kind == "backward"]
    assert forward == [1, 2, 1, 1]
    assert backward == [1, 1, 2, 1]  # the same regions, last to first


def test_untouched_outside_the_context_without_threshold_and_without_graph(monkeypatch, two_threads):
    x = torch.randn(10, requires_grad=True)
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "100")
    assert threads.enter(x) is x  # no context: nothing happens
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "0")
    with threads.small_steps_serial():
        assert threads.enter(x) is x and torch.get_num_threads() == 2
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "100")
    with threads.small_steps_serial(active=False):
        assert threads.enter(x) is x and torch.get_num_threads() == 2
    with threads.small_steps_serial(), torch.no_grad():  # no backward pass: a plain switch
        assert threads.enter(x) is x and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def _cell():
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    atoms.numbers[[1, 3, 6]] = 13
    atoms.rattle(0.1, seed=2)
    return AtomicGraph.from_atoms(atoms, 4.0, dtype=torch.float64)


def _equiformer():
    torch.manual_seed(0)
    model = EquiformerV2(cutoff=4.0, avg_num_neighbors=20.0, num_layers=2, lmax=2, mmax=2, channels=16,
                         attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8, attn_value_channels=8,
                         ffn_hidden_channels=16, edge_channels=16, num_basis=16)
    return Potential(model, 4.0, scale=1.0).double().eval()


def test_equiformer_gives_the_same_forces_and_stress_with_small_steps_serial(monkeypatch, two_threads):
    graph, potential = _cell(), _equiformer()
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "0")
    want = potential(graph)
    switches = []
    apply = threads._Switch.apply

    def spy(x, forward_threads, backward_threads):
        switches.append((forward_threads, backward_threads))
        return apply(x, forward_threads, backward_threads)

    monkeypatch.setattr(threads._Switch, "apply", spy)
    for threshold, serial in [("1500", True), (str(10**9), False)]:
        switches.clear()
        monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", threshold)
        got = potential(graph)
        assert torch.get_num_threads() == 2
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-13)
        if serial:  # node steps (8 atoms × 9 × 16 = 1152 values) on one thread, edge steps on two
            assert (1, 2) in switches and (2, 1) in switches
        else:  # everything below the threshold: one switch into one thread at the start
            assert switches == [(1, 2)]


def test_thread_count_is_restored_when_the_model_fails(monkeypatch, two_threads):
    class Failing(EnergyModel):
        def forward(self, graph):
            threads.enter(graph.edge_vec.sum(-1, keepdim=True).expand(-1, 4))
            assert torch.get_num_threads() == 1
            raise RuntimeError("model failure")

    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "100000")
    with pytest.raises(RuntimeError, match="model failure"):
        Potential(Failing(4.0), 4.0).double().eval()(_cell())
    assert torch.get_num_threads() == 2


def test_training_keeps_the_thread_count(monkeypatch, two_threads):
    """Training (the derivative graph kept) never switches: the second backward pass would not pass the switches
    in order."""
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "100000")
    potential = _equiformer().train()
    seen = []
    monkeypatch.setattr(threads._Switch, "apply", lambda *a: seen.append(a) or a[0])
    out = potential(_cell())
    (out["forces"] ** 2).sum().backward()
    assert seen == [] and torch.get_num_threads() == 2


def test_other_threads_never_switch(monkeypatch, two_threads):
    """A count set in a worker thread would become the default of threads started meanwhile: only the main thread
    switches."""
    monkeypatch.setenv("POTENTIALS_SERIAL_BELOW", "100000")
    seen = []

    def work():
        x = torch.randn(10, requires_grad=True)
        with threads.small_steps_serial():
            seen.append(threads.enter(x) is x)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == [True] and torch.get_num_threads() == 2
