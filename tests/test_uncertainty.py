"""Uncertainty: committee and shallow-ensemble files, the spread's formulas, calibration, training and evaluate."""

from __future__ import annotations

import json

import ase.build
import ase.io
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch_geometric.data import Batch

from potentials import export
from potentials.calculator import PotentialCalculator
from potentials.conf import CONFIG_DIR
from potentials.datasets import emt
from potentials.errors import PotentialsInputError
from potentials.evaluate import evaluate_file
from potentials.graph import AtomicGraph
from potentials.potential import Potential, head_gradients
from potentials.training.ensemble import (
    FORCES_VARIANCE_FLOOR,
    EnsembleLoss,
    fit_calibration,
    gaussian_nll,
    member_config,
)
from potentials.training.finetune import committee_size, load_base
from potentials.training.loss import PotentialLoss
from potentials.training.run import register_resolvers, run
from potentials.uncertainty import EnsemblePotential, ShallowEnsemble, fit_scale
from tests.tiny_model import CUTOFF, MODEL_CONFIG, _model, fit_cu, single_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL_DATA = ["data.source.n_structures=24", "data.batch_size=4", "data.split.val=4", "data.split.test=4"]


def _fit(seed: int, frames, steps: int = 60, heads: int = 0) -> Potential:
    """A tiny EGNN (or shallow ensemble of ``heads``) fitted to ``frames`` from initial-weight seed ``seed``."""
    torch.manual_seed(seed)
    return fit_cu(ShallowEnsemble(_model(), heads) if heads else _model(), frames, steps)


@pytest.fixture(scope="module")
def cu_frames():
    return emt.generate(seed=5, n_structures=12, elements=("Cu",))


@pytest.fixture(scope="module")
def committee(tmp_path_factory, cu_frames):
    """A two-member committee fitted to EMT Cu, saved as training saves it; (path, members)."""
    with single_thread():
        members = [_fit(seed, cu_frames) for seed in (0, 1)]
    path = export.save(EnsemblePotential(members), tmp_path_factory.mktemp("committee") / "model.pt", MODEL_CONFIG)
    return path, members


def _rattled_cu(a: float = 3.6, seed: int = 1):
    atoms = ase.build.bulk("Cu", "fcc", a=a, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_committee_file_gives_the_members_mean_and_spread(committee):
    path, members = committee
    atoms = _rattled_cu()
    singles = []
    for member in members:
        atoms.calc = PotentialCalculator(member, dtype="float64")
        singles.append({k: np.array(atoms.calc.get_property(k, atoms)) for k in ("energy", "forces", "stress")})
    calc = PotentialCalculator.from_file(path, dtype="float64")
    assert isinstance(calc.potential, EnsemblePotential) and calc.potential.size == 2
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    e = np.array([s["energy"] for s in singles])
    f = np.stack([s["forces"] for s in singles])
    s = np.stack([s["stress"] for s in singles])
    assert energy == pytest.approx(e.mean(), abs=1e-9)
    np.testing.assert_allclose(forces, f.mean(0), atol=1e-9)
    np.testing.assert_allclose(stress, s.mean(0), atol=1e-12)
    assert calc.results["energy_std"] == pytest.approx(abs(e[0] - e[1]) / 2, abs=1e-9)
    # forces_std: per atom, sqrt of the mean over members of |F_i^m - mean F_i|^2
    expected = np.sqrt(((f - f.mean(0)) ** 2).sum(-1).mean(0))
    assert calc.results["forces_std"].shape == (len(atoms),)
    np.testing.assert_allclose(calc.results["forces_std"], expected, atol=1e-9)
    assert np.all(expected > 0)
    np.testing.assert_allclose(calc.results["stress_std"], np.abs(s[0] - s[1]) / 2, atol=1e-12)


def test_committee_file_format_and_older_reader(committee, monkeypatch):
    path, _ = committee
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == 5 and payload["ensemble"]["kind"] == "committee"
    assert len(payload["ensemble"]["members"]) == 1  # the first member is the file's own model section
    loaded = export.load(path)
    assert loaded.metadata["ensemble"]["size"] == 2 and "members" not in loaded.metadata["ensemble"]
    monkeypatch.setattr(export, "FORMAT_VERSION", 4)  # a reader from before ensembles
    with pytest.raises(PotentialsInputError, match="upgrade potentials"):
        export.load(path)


def test_potentials_load_returns_the_spread(committee):
    import potentials

    path, _ = committee
    ensemble = potentials.load(path)
    graph = AtomicGraph.from_atoms(_rattled_cu(), ensemble.cutoff)
    out = ensemble(Batch.from_data_list([graph]))
    assert out["energy_std"].shape == (1,) and out["forces_std"].shape == (8,) and out["stress_std"].shape == (1, 3, 3)
    assert out["energy_members"].shape == (1, 2)


def test_spread_grows_off_distribution(committee):
    """Cu compressed by 15 % (never seen in training) gets a larger spread than a training-like cell."""
    _, members = committee
    calc = PotentialCalculator(EnsemblePotential(members), dtype="float64")
    spread = {}
    for name, a in (("train-like", 3.6), ("compressed", 3.06)):
        atoms = _rattled_cu(a)
        atoms.calc = calc
        atoms.get_potential_energy()
        spread[name] = (calc.results["energy_std"] / len(atoms), float(np.mean(calc.results["forces_std"])))
    assert spread["compressed"][0] > 3 * spread["train-like"][0], spread
    assert spread["compressed"][1] > 3 * spread["train-like"][1], spread


def test_recalibration_is_fitted_stored_and_applied(committee, cu_frames, tmp_path):
    _, members = committee
    ensemble = EnsemblePotential(members)
    graphs = [AtomicGraph.from_atoms(a, CUTOFF) for a in cu_frames[:6]]
    atoms = _rattled_cu()
    atoms.calc = PotentialCalculator(ensemble)
    atoms.get_potential_energy()
    raw = atoms.calc.results["forces_std"].copy(), atoms.calc.results["energy_std"]
    scales = fit_calibration(ensemble, graphs)
    assert ensemble.calibration == scales and scales["forces"] > 0 and scales["forces"] != 1.0
    path = export.save(ensemble, tmp_path / "calibrated.pt", MODEL_CONFIG)
    atoms.calc = PotentialCalculator.from_file(path)
    atoms.get_potential_energy()
    assert atoms.calc.potential.calibration == pytest.approx(scales)
    np.testing.assert_allclose(atoms.calc.results["forces_std"], scales["forces"] * raw[0], rtol=1e-5)
    assert atoms.calc.results["energy_std"] == pytest.approx(scales["energy"] * raw[1], rel=1e-5)
    # the scalar makes the RMS of the scaled std equal the RMSE
    assert fit_scale(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(2.0)
    assert fit_scale(np.array([1.0, 1.0]), np.array([3.0, 1.0])) == pytest.approx(np.sqrt(5.0))


def test_evaluate_writes_the_uncertainty_keys(committee, tmp_path):
    path, _ = committee
    frames = emt.generate(seed=11, n_structures=6, elements=("Cu",))
    data = tmp_path / "cu.extxyz"
    ase.io.write(data, frames)
    metrics, files = evaluate_file(path, data, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    u = written["uncertainty"]
    for level in ("forces_per_atom", "forces_per_structure", "energy_per_structure"):
        assert -1.0 <= u[level]["spearman"] <= 1.0 and u[level]["binned"], level
        assert all({"std_rms", "rmse", "n"} <= set(row) for row in u[level]["binned"])
    assert u["forces_per_atom"]["n"] == sum(len(a) for a in frames) and u["forces_per_structure"]["n"] == 6
    assert u["calibration_scale"] == {"energy": 1.0, "forces": 1.0}
    assert (tmp_path / "out" / "uncertainty_calibration.png").is_file()
    # a single model reports no uncertainty
    single = export.save(committee[1][0], tmp_path / "single.pt", MODEL_CONFIG)
    metrics, _ = evaluate_file(single, data, tmp_path / "single")
    assert "uncertainty" not in metrics


def test_shallow_heads_are_independent_and_spread(cu_frames):
    with single_thread():
        potential = _fit(0, cu_frames, steps=30, heads=3)
    model = potential.model
    graph = Batch.from_data_list([AtomicGraph.from_atoms(_rattled_cu(), CUTOFF)])
    out = potential(graph)
    assert out["energy_heads"].shape == (1, 3)
    assert out["energy"].item() == pytest.approx(out["energy_heads"].mean().item(), rel=1e-5)
    model.active_head = 0
    head0 = potential(graph)["energy"].item()
    with torch.no_grad():  # changing head 2's weights leaves head 0 as it was
        model.backbone.readout[-1].weight[2].add_(1.0)
    assert potential(graph)["energy"].item() == pytest.approx(head0, rel=1e-6)
    model.active_head = None
    ensemble = EnsemblePotential([potential], kind="shallow")
    out = ensemble(graph)
    assert ensemble.size == 3 and out["energy_std"].item() > 0 and bool((out["forces_std"] > 0).all())
    with pytest.raises(PotentialsInputError, match="at least 2 heads"):
        ShallowEnsemble(_model(), 1)


def test_shallow_forces_std_in_one_pass_equals_the_per_head_loop(cu_frames):
    torch.manual_seed(0)
    potential = Potential(ShallowEnsemble(_model(), 3), CUTOFF, {29: -3.5}, scale=0.5).eval()
    graph = Batch.from_data_list([AtomicGraph.from_atoms(_rattled_cu(seed=s), CUTOFF) for s in (1, 2)])
    out = EnsemblePotential([potential], kind="shallow")(graph)
    reference = []
    for k in range(3):  # the reference: one full evaluation per head
        potential.model.active_head = k
        reference.append(potential(graph))
    potential.model.active_head = None
    forces = torch.stack([r["forces"] for r in reference])
    stress = torch.stack([r["stress"] for r in reference])
    energy = torch.stack([r["energy"] for r in reference])
    torch.testing.assert_close(out["forces"], forces.mean(0))
    torch.testing.assert_close(out["forces_std"], (forces - forces.mean(0)).pow(2).sum(-1).mean(0).sqrt())
    torch.testing.assert_close(out["stress_std"], (stress - stress.mean(0)).pow(2).mean(0).sqrt())
    torch.testing.assert_close(out["energy_members"], energy.T)
    assert bool((out["forces_std"] > 0).all())
    # the batched backward pass and one pass per head agree
    graph.pos.requires_grad_(True)
    heads = potential(graph, compute_forces=False, compute_stress=False)["energy_heads"]
    (batched,) = head_gradients(heads, [graph.pos], create_graph=False)
    (looped,) = head_gradients(heads, [graph.pos], create_graph=False, batched=False)
    torch.testing.assert_close(batched, looped)
    torch.testing.assert_close(-batched, forces)


def test_gaussian_nll_is_smallest_where_the_spread_equals_the_error():
    residual = 0.3
    sigmas = torch.linspace(0.05, 1.0, 96)
    # heads ±σ around the mean 0: population variance σ²
    heads = torch.stack([sigmas, -sigmas], dim=-1)
    nll = gaussian_nll(torch.full_like(sigmas, residual), heads, floor=0.0)
    assert float(sigmas[int(nll.argmin())]) == pytest.approx(residual, abs=0.011)
    assert float(nll.min()) == pytest.approx(0.5 * (np.log(residual ** 2) + 1.0), abs=1e-3)
    # β-NLL with β = 1: the mean's gradient is the squared error's, the spread still settles at the residual
    for spread, sign in ((0.1, -1.0), (0.3, 0.0), (0.6, 1.0)):
        heads = torch.tensor([[0.2 + spread, 0.2 - spread]], requires_grad=True)
        gaussian_nll(torch.tensor([0.2 + residual]), heads, floor=0.0, beta=1.0).sum().backward()
        d_mean, d_spread = heads.grad.sum().item(), (heads.grad[0, 0] - heads.grad[0, 1]).item()
        assert d_mean == pytest.approx(-residual, rel=1e-5)  # d/dμ ½(y − μ)²
        assert np.sign(round(d_spread, 6)) == sign  # too small a spread grows, too large shrinks


def test_shallow_force_nll_heads_independent_gradient_flows_loss_finite(cu_frames):
    torch.manual_seed(0)
    potential = Potential(ShallowEnsemble(_model(), 3), CUTOFF, {29: -3.5}, scale=0.5).train()
    batch = Batch.from_data_list([AtomicGraph.from_atoms(a, CUTOFF) for a in cu_frames[:4]])
    out = potential(batch, compute_stress=False, head_forces=True)
    assert out["forces_heads"].shape == (3, batch.num_nodes, 3)
    torch.testing.assert_close(out["forces"], out["forces_heads"].mean(0))
    loss_fn = EnsembleLoss(PotentialLoss(energy_weight=1.0, forces_weight=10.0), nll_weight=0.0,
                           forces_nll_weight=1.0)
    assert loss_fn.needs_head_forces
    losses = loss_fn(out, batch)
    assert "energy_nll" not in losses and bool(torch.isfinite(losses["forces_nll"]))
    # the term is the Gaussian NLL of every force component under the heads' mean and variance
    f = out["forces_heads"]
    var = f.var(0, unbiased=False) + FORCES_VARIANCE_FLOOR
    expected = 0.5 * (var.log() + (batch.forces - f.mean(0)) ** 2 / var)
    torch.testing.assert_close(losses["forces_nll"], expected.mean())
    # its gradient reaches every head's row of the last readout layer and the backbone
    losses["forces_nll"].backward()
    last = potential.model.backbone.readout[-1].weight
    assert last.grad is not None and bool((last.grad.abs().sum(1) > 0).all())
    first = next(potential.model.backbone.parameters())
    assert first.grad is not None and float(first.grad.abs().sum()) > 0
    # heads are independent: changing head 2 moves head 2's forces only
    potential.eval()
    before = potential(batch, compute_stress=False, head_forces=True)["forces_heads"]
    with torch.no_grad():
        last[2].add_(0.5)
    after = potential(batch, compute_stress=False, head_forces=True)["forces_heads"]
    torch.testing.assert_close(after[:2], before[:2])
    assert float((after[2] - before[2]).abs().max()) > 1e-4


def _config(tmp_path, *overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"run_dir={tmp_path}", f"data_root={tmp_path / 'data'}", "logger=csv",
                                           "trainer.enable_progress_bar=false", "trainer.max_time=null",
                                           "trainer.enable_model_summary=false", "model.channels=16",
                                           "model.num_layers=2", "trainer.max_epochs=2", "demo_relax=false",
                                           "figures=false", *SMALL_DATA, *overrides])


def test_committee_trains_member_by_member_and_resumes(tmp_path):
    cfg = _config(tmp_path / "run", "ensemble.size=2", "trainer.max_time=00:00:10:00")
    member = member_config(cfg, 1, {"seed": 0, "split": {"seed": 0}}, tmp_path / "m1")
    assert member.seed == 1 and member.data.seed == 1 and member.data.split.seed == 0  # same split, other order
    assert member.trainer.max_time == "00:00:05:00"  # the committee's budget, shared
    summary = run(cfg)
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ensemble"]["size"] == 2 and set(metrics["ensemble"]["calibration"]) == {"energy", "forces"}
    assert np.isfinite(metrics["test"]["test/force_mae"]) and "forces_per_atom" in metrics["uncertainty"]
    loaded = export.load(summary["model"])
    assert isinstance(loaded, EnsemblePotential) and loaded.calibration == pytest.approx(
        metrics["ensemble"]["calibration"])
    # killed before the second member finished: the rerun keeps the first and resumes the second
    first = (run_dir / "members" / "0" / "model.pt").stat().st_mtime_ns
    (run_dir / "members" / "1" / "model.pt").unlink()
    (run_dir / "model.pt").unlink()
    run(cfg)
    assert (run_dir / "members" / "0" / "model.pt").stat().st_mtime_ns == first
    assert (run_dir / "members" / "1" / "model.pt").is_file() and (run_dir / "model.pt").is_file()


def test_init_from_a_committee_gives_each_member_its_own_weights(committee, tmp_path):
    path, members = committee
    for i, member in enumerate(members):
        base = load_base(f"{path}#{i}")
        assert base.path == path
        for name, value in member.model.state_dict().items():
            torch.testing.assert_close(base.state[name], value.double())
    assert load_base(path).state["readout.0.weight"].equal(load_base(f"{path}#0").state["readout.0.weight"])
    with pytest.raises(PotentialsInputError, match="has 2 members"):
        load_base(f"{path}#2")
    cfg = _config(tmp_path / "run", "ensemble.size=3", f"init_from={path}")
    assert committee_size(path) == 2
    assert [member_config(cfg, i, {"seed": 0}, tmp_path / str(i), committee_size(path)).init_from
            for i in range(3)] == [f"{path}#0", f"{path}#1", f"{path}#0"]
    single = export.save(members[0], tmp_path / "single.pt", MODEL_CONFIG)
    assert committee_size(single) is None
    with pytest.raises(PotentialsInputError, match="single model"):
        load_base(f"{single}#1")


def test_committee_members_in_parallel_processes_match_one_after_another(tmp_path):
    cfg = _config(tmp_path / "par", "ensemble.size=2", "ensemble.parallel=true", "trainer.max_time=00:00:10:00")
    assert member_config(cfg, 1, {"seed": 0}, tmp_path / "m1").trainer.max_time == "00:00:10:00"  # all of it
    parallel = run(cfg)
    serial = run(_config(tmp_path / "seq", "ensemble.size=2"))
    for a, b in zip(parallel["members"], serial["members"], strict=True):
        assert "/par/" in a and "/seq/" in b
        state_a, state_b = export.load(a).state_dict(), export.load(b).state_dict()
        assert state_a.keys() == state_b.keys()
        for name in state_a:  # the same seeds, data and batch order: the same weights
            torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-4, atol=1e-6)
    first, second = (export.load(m).state_dict() for m in parallel["members"])
    assert any(not torch.equal(first[k], second[k]) for k in first)  # and the members differ
    assert parallel["test"]["test/force_mae"] == pytest.approx(serial["test"]["test/force_mae"], rel=1e-3)
    with pytest.raises(PotentialsInputError, match="ensemble.parallel"):
        run(_config(tmp_path / "ddp", "ensemble.size=2", "ensemble.parallel=true", "trainer.devices=2"))


def test_shallow_ensemble_trains_exports_and_reports(tmp_path):
    summary = run(_config(tmp_path, "ensemble.kind=shallow", "ensemble.size=3"))
    assert summary["ensemble"]["kind"] == "shallow" and summary["ensemble"]["calibration"]["forces"] > 0
    assert "forces_per_atom" in summary["uncertainty"]
    csv = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss_energy_nll" in csv and "train/loss_forces_nll" in csv
    calc = PotentialCalculator.from_file(summary["model"])
    assert calc.potential.kind == "shallow" and calc.potential.size == 3
    atoms = _rattled_cu()
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.results["energy_std"] > 0 and bool(np.all(calc.results["forces_std"] > 0))
    with pytest.raises(PotentialsInputError, match="ensemble.kind"):
        run(_config(tmp_path / "bad", "ensemble.kind=bagging", "ensemble.size=2"))


def test_md_and_relax_log_flag_and_stop_on_uncertainty(committee, tmp_path):
    from ase.io import read

    from potentials.md import run_md
    from potentials.relax import relax

    path, members = committee
    calc = PotentialCalculator.from_file(path)
    atoms = _rattled_cu()
    free = run_md(atoms, calc, steps=6, interval=2, uncertainty_log=tmp_path / "free.log")
    lines = (tmp_path / "free.log").read_text().splitlines()[1:]
    assert [int(line.split()[0]) for line in lines] == [0, 2, 4, 6] and free.stopped_at_step is None
    assert free.uncertainty["max_force_std_eV_per_A"] > 0
    result = run_md(atoms, calc, steps=20, interval=5, max_uncertainty=0.0, stop_on_uncertainty=True,
                    trajectory=tmp_path / "md.traj", uncertainty_log=tmp_path / "md.log")
    assert result.stopped_at_step == 0 and len(result.time_ps) == 1  # every frame is above a zero threshold
    frames = read(tmp_path / "md.traj", ":")
    assert frames[-1].info["uncertain"] and frames[-1].info["max_force_std"] > 0
    assert "UNCERTAIN" in (tmp_path / "md.log").read_text()
    assert result.summary()["uncertainty"]["stopped_at_step"] == 0
    relaxed = relax(atoms, calc, steps=50, max_uncertainty=0.0, stop_on_uncertainty=True)
    assert not relaxed.converged and relaxed.uncertainty["stopped_at_step"] == 0
    relaxed = relax(atoms, calc, steps=5, max_uncertainty=1e9)
    assert relaxed.uncertainty["n_uncertain_steps"] == 0 and relaxed.uncertainty["max_force_std_eV_per_A"] > 0
    with pytest.raises(PotentialsInputError, match="need a model with uncertainty"):
        run_md(atoms, PotentialCalculator(members[0]), steps=2, max_uncertainty=0.1)


def test_select_prefers_uncertain_frames_but_not_one_event_twice(committee, tmp_path, capsys):
    from potentials.cli.main import main
    from potentials.select import frame_scores, rms_distance, select_frames

    path, members = committee
    base = _rattled_cu()
    event = []  # five nearly identical frames of one compressed event (high spread), then distinct normal frames
    for k in range(5):
        atoms = _rattled_cu(3.2, seed=2)
        atoms.positions[0] += 0.002 * k
        event.append(atoms)
    others = [_rattled_cu(3.6, seed=10 + k) for k in range(4)]
    frames = event + others
    scores = frame_scores(frames, PotentialCalculator.from_file(path))
    assert scores[:5].min() > scores[5:].max()  # the compressed event is the most uncertain
    greedy = select_frames(frames, scores, 3, min_distance=0.0)
    assert set(greedy.indices) <= set(range(5))  # without the rule: three copies of one event
    diverse = select_frames(frames, scores, 3, min_distance=0.05)
    assert len([i for i in diverse.indices if i < 5]) == 1 and diverse.skipped_as_similar == 4
    assert all(rms_distance(frames[a], frames[b]) >= 0.05 for a in diverse.indices for b in diverse.indices if a < b)
    assert rms_distance(base, base) == 0.0

    data = tmp_path / "pool.extxyz"
    ase.io.write(data, frames)
    out = tmp_path / "to_label.extxyz"
    assert main(["select", str(path), str(data), "--n", "3", "--min-distance", "0.05", "--out", str(out)]) in (0, None)
    picked = ase.io.read(out, ":")
    assert [a.info["source_index"] for a in picked] == diverse.indices
    single = export.save(members[0], tmp_path / "single.pt", MODEL_CONFIG)
    code = main(["select", str(single), str(data), "--n", "3", "--out", str(tmp_path / "x.extxyz")])
    assert code == 2 and "needs a model with uncertainty" in capsys.readouterr().err
