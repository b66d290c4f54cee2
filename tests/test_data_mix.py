"""Several datasets in one run (``data=mix``): weighted batches, pooled statistics, per-dataset metrics, a graph
store in the mix, bad input, and a kill-and-rerun that ends where an uninterrupted run ends."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import ase.build
import ase.io
import numpy as np
import pandas as pd
import pytest
import torch
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from potentials.calculator import PotentialCalculator
from potentials.datasets import emt
from potentials.datasets.mix import ConcatSplit, MixDataModule, WeightedGlobalBatchSampler
from potentials.datasets.preprocess import convert
from potentials.datasets.stats import compute_stats
from potentials.errors import PotentialsInputError
from potentials.export import load
from potentials.training.checkpointing import checkpoint_step
from potentials.training.run import build, run
from tests.train_config import train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["logger=csv", "trainer.max_time=null", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "model.channels=8", "model.num_layers=1",
        "dtype=float64", "demo_relax=false", "figures=false", "export=false", "checkpoint.every_n_minutes=null"]


def _emt_mix(*extra: str) -> list[str]:
    """Two embedded EMT sets (different seeds and sizes), the second drawn three times as often."""
    return ["data=mix", "+data@data.datasets.big=emt", "+data@data.datasets.small=emt",
            "data.datasets.big.source.n_structures=14", "data.datasets.small.source.n_structures=10",
            "data.datasets.small.source.seed=7", "+data.datasets.small.weight=3", "data.datasets.big.split.val=3",
            "data.datasets.big.split.test=2", "data.datasets.small.split.val=2", "data.datasets.small.split.test=2",
            "data.batch_size=2", *extra]


# ----------------------------------------------------------------------------------------------- the sampler


def test_draws_follow_the_weights_and_cycle_each_dataset_without_repeats():
    sizes, weights = [3, 40, 11], [1.0, 2.0, 5.0]
    sampler = WeightedGlobalBatchSampler(sizes, weights, batch_size=4, epoch_size=1000, seed=3)
    assert sampler.num_batches == 250 and len(sampler) == 1000
    counts = np.zeros(3)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = sampler.global_order()
        parts = sampler.dataset_of(order)
        counts += np.bincount(parts, minlength=3)
        for k, size in enumerate(sizes):  # within a dataset: a fresh permutation each time it is used up
            local = [i - sampler.offsets[k] for i, p in zip(order, parts, strict=True) if p == k]
            for start in range(0, len(local) - size + 1, size):
                assert sorted(local[start:start + size]) == list(range(size))
    n, p = counts.sum(), np.array(weights) / sum(weights)
    sigma = np.sqrt(n * p * (1 - p))  # binomial spread of each count
    assert n == 4000 and np.all(np.abs(counts - n * p) < 4 * sigma), (counts, n * p, sigma)
    # with equal weights the same test fails, so it measures the weights
    assert np.any(np.abs(counts - n / 3) > 4 * np.sqrt(n * 2 / 9))


def test_draw_depends_on_seed_and_epoch_only_and_splits_into_global_batches():
    def order(epoch: int, seed: int = 0, **kwargs) -> list[int]:
        sampler = WeightedGlobalBatchSampler([5, 9], [1, 1], epoch_size=30, seed=seed, **kwargs)
        sampler.set_epoch(epoch)
        return list(sampler)

    one = order(2, batch_size=4)
    assert len(one) == 32 and one == order(2, batch_size=4)  # whole global batches; reproducible
    assert one != order(3, batch_size=4) and one != order(2, seed=1, batch_size=4)
    # two processes with batch 2 step through the global batches of one process with batch 4
    ranks = [order(2, batch_size=2, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 16
    for b in range(8):
        pairs = zip(ranks[0][2 * b:2 * b + 2], ranks[1][2 * b:2 * b + 2], strict=True)
        assert [i for pair in pairs for i in pair] == one[4 * b:4 * b + 4]
    resumed = WeightedGlobalBatchSampler([5, 9], [1, 1], batch_size=4, epoch_size=30)
    resumed.set_epoch(2)
    resumed.start_batch = 3  # resuming after three batches of the epoch: the rest of the same draw
    assert list(resumed) == one[12:]


def test_concatenated_split_indexes_its_parts():
    split = ConcatSplit([["a", "b"], [], ["c"]])
    assert len(split) == 3 and [split[i] for i in range(3)] == ["a", "b", "c"] and list(split) == ["a", "b", "c"]
    with pytest.raises(IndexError):
        split[3]


# ----------------------------------------------------------------------------------------------- training


def _aluminium(path: Path, n: int = 12) -> Path:
    """Rattled, strained Al cells labelled with EMT: an element the EMT metal set does not hold."""
    frames = []
    rng = np.random.default_rng(0)
    for k in range(n):
        atoms = ase.build.bulk("Al", "fcc", a=4.05 * (1 + 0.02 * rng.standard_normal()), cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                     stress=atoms.get_stress())
        atoms.calc = calc
        frames.append(atoms)
    ase.io.write(path, frames)
    return path


def test_store_and_file_mix_trains_with_pooled_statistics_and_per_dataset_metrics(tmp_path, data_root):
    """A graph store of EMT metals + an extxyz of Al: statistics of both training splits, metrics per dataset and
    pooled in metrics.json and the CSV log, best.ckpt by the dataset chosen."""
    store = tmp_path / "metals"
    convert(lambda: emt.generate(seed=2, n_structures=16), store, cutoff=5.0, dtype="float64")
    al = _aluminium(tmp_path / "al.extxyz")
    overrides = [*TINY, "data=mix", "+data@data.datasets.metals=store", f"data.datasets.metals.path={store}",
                 "data.datasets.metals.split.val=3", "data.datasets.metals.split.test=3",
                 "+data@data.datasets.al=ase", f"data.datasets.al.path={al}", "+data.datasets.al.weight=0.5",
                 "data.datasets.al.split.val=2", "data.datasets.al.split.test=2", "data.batch_size=4",
                 "data.monitor_dataset=al", "trainer.max_epochs=2", "test=true"]
    cfg = train_config(tmp_path / "run", data_root, *overrides)
    dm, _ = build(cfg.copy())
    metals, al_part = dm.modules["metals"].splits["train"], dm.modules["al"].splits["train"]
    assert len(dm.splits["train"]) == len(metals) + len(al_part) == 10 + 8
    pooled = compute_stats(itertools.chain(metals, al_part))
    assert dm.stats.elements == pooled.elements and 13 in pooled.elements and 29 in pooled.elements
    # no element in common: the weighted fit of E0 splits into one fit per dataset, the same as the unweighted one
    assert dm.stats.atomic_energies == pytest.approx(pooled.atomic_energies, rel=1e-12)
    alone = compute_stats(iter(metals))
    assert dm.stats.force_rms != pytest.approx(alone.force_rms, rel=1e-6)  # both datasets count
    sampler = dm.train_dataloader().sampler
    assert sampler.weights.tolist() == [1.0, 0.5] and sampler.num_batches == 5  # 18 structures, batches of 4

    summary = run(cfg)
    assert summary["data_stats"]["elements"] == pooled.elements
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    for metric in ("force_mae", "energy_mae"):
        each = [test[f"test/{name}/{metric}"] for name in ("metals", "al")]
        assert min(each) <= test[f"test/{metric}"] <= max(each) and each[0] != each[1]
    frame = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    for column in ("val/force_mae", "val/metals/force_mae", "val/al/force_mae", "test/al/force_mae"):
        assert frame[column].notna().sum() >= 1, column
    assert frame["val/al/force_mae"].notna().sum() == 2  # every epoch
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    monitors = {state.get("monitor") for state in best["callbacks"].values()}
    assert "val/al/force_mae" in monitors


def _cu_ag(path: Path, n: int, seed: int, shift_per_atom: float = 0.0) -> Path:
    """``n`` EMT Cu/Ag structures as extxyz, every atom's energy shifted by ``shift_per_atom`` eV (another reference:
    a different DFT setting)."""
    frames = emt.generate(seed=seed, n_structures=n, elements=["Cu", "Ag"])
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy() + shift_per_atom * len(atoms),
                                           forces=atoms.get_forces())
    ase.io.write(path, frames, format="extxyz")
    return path


def _counts_energies(graphs, elements: list[int]) -> tuple[np.ndarray, np.ndarray]:
    graphs = list(graphs)
    counts = np.array([[int((g.z == z).sum()) for z in elements] for g in graphs], dtype=np.float64)
    return counts, np.array([float(g.energy) for g in graphs])


def test_mix_reference_energies_are_fitted_with_the_sampling_weights(tmp_path, data_root):
    """Two Cu/Ag sets whose energies differ by 0.4 eV/atom, 20 and 5 training structures, the small one drawn three
    times as often: E0 is the least-squares fit with weight w_k / n_k per structure (hand-computed here), i.e.
    3/4 of the way to the small set's offset, not 1/5 of the way as a fit over the pooled structures gives."""
    big = _cu_ag(tmp_path / "big.extxyz", 22, seed=3)
    small = _cu_ag(tmp_path / "small.extxyz", 7, seed=4, shift_per_atom=0.4)
    overrides = [*TINY, "data=mix", "+data@data.datasets.big=ase", f"data.datasets.big.path={big}",
                 "data.datasets.big.split.val=2", "data.datasets.big.split.test=0",
                 "+data@data.datasets.small=ase", f"data.datasets.small.path={small}", "+data.datasets.small.weight=3",
                 "data.datasets.small.split.val=2", "data.datasets.small.split.test=0", "data.batch_size=4"]
    dm, _ = build(train_config(tmp_path / "run", data_root, *overrides))
    elements = [29, 47]
    parts = [_counts_energies(dm.modules[name].splits["train"], elements) for name in ("big", "small")]
    assert [len(p[1]) for p in parts] == [20, 5]
    a, e = np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    w = np.concatenate([np.full(20, (1 / 4) / 20), np.full(5, (3 / 4) / 5)])
    weighted, *_ = np.linalg.lstsq(a * np.sqrt(w)[:, None], e * np.sqrt(w), rcond=None)
    pooled, *_ = np.linalg.lstsq(a, e, rcond=None)
    got = np.array([dm.stats.atomic_energies[z] for z in elements])
    np.testing.assert_allclose(got, weighted, rtol=0, atol=1e-9)
    assert np.abs(got - pooled).max() > 0.1  # ignoring the weights would land here instead
    fit_w = np.array(dm.fit_weights())
    assert fit_w.mean() == pytest.approx(1.0) and fit_w[-1] / fit_w[0] == pytest.approx(3 * 20 / 5)
    # the offset of the fitted E0 against the big set alone: the weighted share of the small set's 0.4 eV
    alone, *_ = np.linalg.lstsq(*parts[0], rcond=None)
    assert np.mean(got - alone) == pytest.approx(0.3, abs=0.05)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("overrides", "message"), [
    (["+data@data.datasets.none=ase", "data.datasets.none.path=AL", "data.datasets.none.source.index=0:0"],
     r"data=mix: dataset 'none' is empty"),
    (["data.monitor_dataset=nosuch"], r"monitor_dataset='nosuch' is not a dataset of the mix.*big, small"),
    (["data.datasets.small.weight=0"], r"dataset 'small' has weight 0.*positive"),
    (["data.datasets.small.weight=-1"], r"dataset 'small' has weight -1.*positive"),
    (["data.datasets.small.weight=heavy"], r"dataset 'small' has weight 'heavy'.*positive"),
    (["data.epoch_size=0"], r"data.epoch_size=0: an epoch needs at least one structure"),
])
def test_bad_mix_is_refused_with_a_message_naming_it(tmp_path, data_root, overrides, message):
    al = str(_aluminium(tmp_path / "al.extxyz", n=2))
    cfg = train_config(tmp_path, data_root, *TINY, *_emt_mix(*(o.replace("AL", al) for o in overrides)))
    with pytest.raises(PotentialsInputError, match=message) as err:
        build(cfg)
    assert "\n" not in str(err.value)


def test_mix_without_datasets_or_with_unknown_monitor_is_refused(tmp_path, data_root):
    with pytest.raises(PotentialsInputError, match=r"at least one dataset.*\+data@data.datasets.NAME"):
        MixDataModule({})
    cfg = train_config(tmp_path, data_root, *TINY, *_emt_mix("training.monitor=val/other/force_mae"))
    with pytest.raises(PotentialsInputError, match=r"training.monitor=val/other/force_mae.*'other'.*big, small"):
        run(cfg)


# ----------------------------------------------------------------------------------------------- kill and rerun

# 16 training structures, batches of 2: 8 steps per epoch, 16 in all; last.ckpt every 2 steps
RESUME = [*TINY, *_emt_mix(), "trainer.max_epochs=2", "test=false", "checkpoint.every_n_train_steps=2"]
RESUME_STEPS = 16
# the run kills itself during its second write over last.ckpt (step 6 of 8 of the first epoch), the temporary file
# complete and not yet renamed: it resumes from the checkpoint of step 4
DIE = "trainer.plugins=[{_target_:tests.fault_injection.FaultyCheckpointIO,die_at:2,stage:written}]"


def _kill_and_rerun(tmp_path: Path, data_root: Path, settings: list[str], caplog) -> None:
    """Runs ``settings`` uninterrupted, then as ``train.py`` killed at step 6 (last.ckpt of step 4) and rerun: the
    two end with the same weights bit for bit and logged the same losses at the same steps."""
    reference = tmp_path / "uninterrupted"
    run(train_config(reference, data_root, *settings))
    run_dir = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"data_root={data_root}",
               *settings]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # `tests` for the plugin
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    killed = subprocess.run([*command, DIE], env=env, capture_output=True, text=True, timeout=300,
                            start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 4
    with caplog.at_level(logging.INFO, logger="potentials"):
        run(train_config(run_dir, data_root, *settings))  # the same command again (in this process: faster)
    assert f"resuming from {last}" in caplog.text
    ours = torch.load(last, map_location="cpu", weights_only=False)
    theirs = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ours["global_step"] == theirs["global_step"] == RESUME_STEPS
    for key, value in theirs["state_dict"].items():  # the same batches in the same order: bit for bit
        assert torch.equal(ours["state_dict"][key], value), key
    rows = pd.read_csv(run_dir / "csv" / "metrics.csv").dropna(subset=["train/loss_step"])
    expected = pd.read_csv(reference / "csv" / "metrics.csv").dropna(subset=["train/loss_step"])
    assert list(rows["step"]) == list(expected["step"]) == list(range(RESUME_STEPS))
    assert rows["train/loss_step"].tolist() == expected["train/loss_step"].tolist()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_killed_mix_run_resumes_with_the_same_batches_and_weights(tmp_path, data_root, dtype, caplog):
    _kill_and_rerun(tmp_path, data_root, [*RESUME, f"dtype={dtype}"], caplog)


@pytest.fixture(scope="module")
def cu_ag_base(tmp_path_factory) -> Path:
    """A tiny EGNN trained one epoch on EMT Cu and Ag, float32: the base of the fine-tuning runs below."""
    root = tmp_path_factory.mktemp("base")
    run(train_config(root / "run", root / "data", *TINY, "dtype=float32", "export=true", "data.source.n_structures=10",
                     "+data.source.elements=[Cu,Ag]", "trainer.max_epochs=1", "test=false"))
    return root / "run" / "model.pt"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_killed_finetuning_mix_run_resumes_with_the_same_steps(tmp_path, data_root, cu_ag_base, dtype, caplog):
    """Fine-tuning with replay (``init_from`` + ``data=mix``; Au is new to the base), killed mid-epoch and rerun
    with the same command: the checkpoint wins over ``init_from`` and the run ends bit for bit where the
    uninterrupted run ends, in float32 as in float64."""
    settings = [*RESUME, f"dtype={dtype}", f"init_from={cu_ag_base}", "data.monitor_dataset=small", "export=true"]
    _kill_and_rerun(tmp_path, data_root, settings, caplog)
    sha = hashlib.sha256(cu_ag_base.read_bytes()).hexdigest()
    for name in ("uninterrupted", "killed"):  # both fine-tuned the base, which did not know Au
        meta = load(tmp_path / name / "model.pt").metadata
        assert meta["lineage"]["base"]["sha256"] == sha
        assert 79 in meta["elements"]


# ----------------------------------------------------------------------------------------------- per-dataset references

CU_SHIFT = 0.5  # eV per Cu atom: the second "DFT setting" of the same structures


def _two_settings(tmp_path: Path, n: int = 24, cu_shift: float = CU_SHIFT) -> tuple[Path, Path]:
    """The same EMT structures twice, as extxyz: plain, and with every energy raised by ``cu_shift`` per Cu atom (the
    offset two DFT settings give each element's reference); forces and stress unchanged."""
    rng = np.random.default_rng(4)
    structures = []
    for k in range(n):  # rattled 8-atom fcc cells of random Cu-Ag-Au composition at Vegard's lattice constant
        symbols = list(rng.choice(["Cu", "Ag", "Au"], size=8))
        atoms = ase.build.bulk("Cu", "fcc", a=emt.lattice_constant(symbols), cubic=True).repeat((2, 1, 1))
        atoms.set_chemical_symbols(symbols)
        atoms.rattle(0.05, seed=k)
        structures.append(atoms)
    paths = []
    for name, shift in (("plain", 0.0), ("shifted", cu_shift)):
        frames = []
        for atoms in structures:
            atoms = emt.label(atoms.copy(), record=len(frames))
            results = dict(atoms.calc.results)
            results["energy"] = results["energy"] + shift * int((atoms.numbers == 29).sum())
            atoms.calc = SinglePointCalculator(atoms, **results)
            frames.append(atoms)
        paths.append(tmp_path / f"{name}.extxyz")
        ase.io.write(paths[-1], frames)
    return paths[0], paths[1]


def _settings_mix(plain: Path, shifted: Path, *extra: str) -> list[str]:
    return [*TINY, "data=mix", "+data@data.datasets.plain=ase", f"data.datasets.plain.path={plain}",
            "+data@data.datasets.shifted=ase", f"data.datasets.shifted.path={shifted}",
            "data.datasets.plain.split.val=3", "data.datasets.plain.split.test=4",
            "data.datasets.shifted.split.val=3", "data.datasets.shifted.split.test=4", "data.batch_size=4", *extra]


def test_per_dataset_reference_tables_differ_by_the_labels_offset(tmp_path, data_root):
    """Each dataset's table is the fit on its own training split: the shifted copy's Cu reference is CU_SHIFT higher
    and the others equal; an element one dataset lacks (Al) takes the pooled value; batches carry the dataset."""
    plain, shifted = _two_settings(tmp_path)
    al = _aluminium(tmp_path / "al.extxyz", n=8)
    cfg = train_config(tmp_path / "run", data_root, *_settings_mix(
        plain, shifted, "+data@data.datasets.al=ase", f"data.datasets.al.path={al}", "data.datasets.al.split.val=1",
        "data.datasets.al.split.test=1", "data.per_dataset_references=true", "data.export_references=shifted"))
    dm, module = build(cfg)
    tables = {n: {int(z): e for z, e in t.items()} for n, t in cfg.data_stats.reference_tables.items()}
    pooled = dm.stats.atomic_energies
    assert set(tables) == {"plain", "shifted", "al"} and all(set(t) == set(pooled) for t in tables.values())
    assert tables["shifted"][29] - tables["plain"][29] == pytest.approx(CU_SHIFT, abs=1e-6)
    for z in (47, 79):
        assert tables["shifted"][z] == pytest.approx(tables["plain"][z], abs=1e-6)
    own = compute_stats(iter(dm.modules["plain"].splits["train"])).atomic_energies
    assert tables["plain"][29] == pytest.approx(own[29], abs=1e-9) and tables["plain"][29] != pytest.approx(
        pooled[29], abs=1e-3)
    assert tables["plain"][13] == pooled[13] and tables["al"][29] == pooled[29]  # absent: the pooled fit's value
    # the exported table is the chosen dataset's, and the module moves each structure to its own
    e0 = module.potential.atomic_energies
    assert all(float(e0[z]) == pytest.approx(e, rel=1e-6) for z, e in tables["shifted"].items())  # float32 table
    assert float(module.reference_offsets[0, 29]) == pytest.approx(-CU_SHIFT, abs=1e-6)
    batch = next(iter(dm.train_dataloader()))
    assert batch.dataset_id.shape == (batch.num_graphs,) and set(batch.dataset_id.tolist()) <= {0, 1, 2}
    assert [int(next(iter(loader)).dataset_id[0]) for loader in dm.val_dataloader()] == [0, 1, 2]


def test_mix_without_per_dataset_references_keeps_one_pooled_table(tmp_path, data_root):
    """Option off (the default): the pooled table, no dataset tag on the structures, no extra buffer in the
    checkpoint, no references section in the model file."""
    plain, shifted = _two_settings(tmp_path, n=12)
    cfg = train_config(tmp_path / "run", data_root, *_settings_mix(plain, shifted))
    assert cfg.data.per_dataset_references is False
    dm, module = build(cfg)
    assert "reference_tables" not in cfg.data_stats and not hasattr(module, "reference_offsets")
    assert "reference_offsets" not in module.state_dict()
    e0 = module.potential.atomic_energies
    assert all(float(e0[z]) == pytest.approx(e, rel=1e-6) for z, e in dm.stats.atomic_energies.items())
    assert "dataset_id" not in next(iter(dm.train_dataloader()))
    assert "dataset_id" not in next(iter(dm.val_dataloader()[0]))
    with pytest.raises(PotentialsInputError, match=r"export_references='plain' needs data.per_dataset_references"):
        build(train_config(tmp_path / "run", data_root, *_settings_mix(plain, shifted,
                                                                       "data.export_references=plain")))
    with pytest.raises(PotentialsInputError, match=r"export_references='other' is not a dataset.*plain, shifted"):
        build(train_config(tmp_path / "run", data_root, *_settings_mix(
            plain, shifted, "data.per_dataset_references=true", "data.export_references=other")))


def test_per_dataset_references_fit_both_settings_and_export_the_chosen_one(tmp_path, data_root):
    """A short training on two settings of the same structures (Cu references 2 eV apart): one pooled table must
    split the offset between them, so its errors on the two add up to about 2 eV × the Cu fraction per atom; with
    one table per dataset the error on both is far lower. model.pt predicts the chosen dataset's absolute energies
    and records every table for `potentials info`."""
    from potentials.cli.info import describe

    shift = 2.0
    plain, shifted = _two_settings(tmp_path, cu_shift=shift)
    common = ["trainer.max_epochs=10", "training.lr=0.02", "data.batch_size=2", "test=true", "export=true",
              "data.monitor_dataset=shifted"]
    errors = {}
    for option in ("false", "true"):
        run(train_config(tmp_path / option, data_root, *_settings_mix(
            plain, shifted, *common, f"data.per_dataset_references={option}")))
        test = json.loads((tmp_path / option / "metrics.json").read_text())["test"]
        errors[option] = {n: test[f"test/{n}/energy_mae"] for n in ("plain", "shifted")}
    off, on = errors["false"], errors["true"]
    assert off["plain"] + off["shifted"] > 0.8 * shift * 1e3 / 3, errors  # meV/atom; a third of the atoms are Cu
    assert max(on.values()) < 0.25 * max(off.values()) and sum(on.values()) < 0.25 * sum(off.values()), errors

    # export_references defaults to the monitored dataset
    calc = PotentialCalculator.from_file(tmp_path / "true" / "model.pt", dtype="float64")
    frames = {n: ase.io.read(p, ":") for n, p in (("plain", plain), ("shifted", shifted))}
    cu = np.array([int((a.numbers == 29).sum()) for a in frames["shifted"]])
    predicted = []
    for atoms in frames["shifted"]:
        atoms = atoms.copy()
        atoms.calc = calc
        predicted.append(atoms.get_potential_energy())
    predicted = np.array(predicted)
    own = np.array([a.get_potential_energy() for a in frames["shifted"]])
    other = np.array([a.get_potential_energy() for a in frames["plain"]])
    assert np.allclose(own - other, shift * cu) and cu.sum() > 0
    per_atom = np.array([len(a) for a in frames["shifted"]])
    assert np.mean(np.abs(predicted - own) / per_atom) < 0.2 * np.mean(np.abs(predicted - other) / per_atom)
    info = describe(str(tmp_path / "true" / "model.pt"))
    assert info["references"]["dataset"] == "shifted"
    tables = info["references"]["tables"]
    assert tables["shifted"]["Cu"] - tables["plain"]["Cu"] == pytest.approx(shift, abs=1e-6)
    assert info["potential"]["atomic_energies"]["Cu"] == pytest.approx(tables["shifted"]["Cu"], rel=1e-6)
    assert load(tmp_path / "true" / "model.pt").metadata["references"]["tables"]["plain"][29] == pytest.approx(
        tables["plain"]["Cu"], abs=1e-12)
    assert "references" not in describe(str(tmp_path / "false" / "model.pt"))


def test_per_dataset_references_with_init_from_is_refused(tmp_path, data_root, cu_ag_base):
    cfg = train_config(tmp_path, data_root, *TINY, *_emt_mix("data.per_dataset_references=true"),
                       f"init_from={cu_ag_base}")
    with pytest.raises(PotentialsInputError, match=r"per_dataset_references=true with init_from") as err:
        build(cfg)
    assert "\n" not in str(err.value)
