"""Fine-tuning (``init_from=``): the base's predictions at step 0, option conflicts, element union and fresh
embedding rows, reference energies kept or refitted, frozen parameters, lineage, and unreadable base files."""

from __future__ import annotations

import copy
import hashlib
import logging
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from torch_geometric.data import Batch

from potentials.datasets import emt
from potentials.errors import PotentialsInputError
from potentials.export import load
from potentials.training import finetune
from potentials.training.run import build, run
from tests.train_config import train_config

TINY = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.max_time=null", "figures=false",
        "model.channels=8", "model.num_layers=1", "data.batch_size=4", "data.split.val=4", "data.split.test=0",
        "checkpoint.every_n_minutes=null", "cutoff=4.0"]
CU_AG = ["data.source.n_structures=20", "+data.source.elements=[Cu,Ag]"]
CU, AG, AU = 29, 47, 79


def _cfg(run_dir: Path, data_root: Path, *overrides: str):
    return train_config(run_dir, data_root, *TINY, *overrides)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base run directory: a tiny EGNN trained two epochs on EMT Cu and Ag (model.pt, checkpoints, config)."""
    root = tmp_path_factory.mktemp("base")
    torch.set_num_threads(1)
    run(_cfg(root / "run", root / "data", *CU_AG, "trainer.max_epochs=2"))
    return root / "run"


def _data_file(path: Path, elements: list[str], offsets: dict[str, float] | None = None, seed: int = 5,
               n: int = 16) -> Path:
    """``n`` EMT frames of ``elements`` written as extxyz, each atom's energy shifted by ``offsets`` (another
    'DFT setting': a constant per element)."""
    frames = emt.generate(seed=seed, n_structures=n, elements=elements)
    for atoms in frames:
        shift = sum((offsets or {}).get(s, 0.0) for s in atoms.get_chemical_symbols())
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy() + shift,
                                           forces=atoms.get_forces())
    ase.io.write(path, frames, format="extxyz")
    return path


def _batch(graphs) -> Batch:
    return Batch.from_data_list(list(graphs)[:6])


def _ase_data(path: Path) -> list[str]:
    return ["data=ase", f"data.path={path}", "data.split.val=2", "data.split.test=0", "data.batch_size=4"]


@pytest.mark.parametrize("source", ["model.pt", "checkpoints/best.ckpt"])
def test_init_from_gives_the_base_predictions_at_step_0(base, tmp_path, source):
    """Energies and forces of the fine-tuning model before any step equal the base model's (keep: the base's
    reference energies), from a model file and from a checkpoint; the EMA copy starts from the same weights."""
    cfg = _cfg(tmp_path / "ft", tmp_path / "data", *CU_AG, "seed=1", f"init_from={base / source}",
               "finetune.reference_energies=keep")
    dm, module = build(cfg, overrides=[])
    reference = load(base / "model.pt")
    batch = _batch(dm.splits["train"])
    want = reference(batch, compute_stress=False)
    for potential in (module.potential.eval(), module.ema):
        got = potential(batch, compute_stress=False)
        torch.testing.assert_close(got["energy"], want["energy"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["forces"], want["forces"], rtol=0, atol=1e-5)
    assert cfg.model.channels == 8 and cfg.cutoff == 4.0


def test_older_checkpoint_is_read_with_its_run_config_or_refused(base, tmp_path):
    """A checkpoint without recorded model options is read with its run's config.yaml; without one, refused."""
    ckpt = torch.load(base / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    del ckpt["potentials"]["model_config"]
    old = base / "checkpoints" / "old.ckpt"
    torch.save(ckpt, old)
    assert finetune.load_base(old).model_config["channels"] == 8  # from <run dir>/config.yaml
    alone = tmp_path / "elsewhere" / "old.ckpt"
    alone.parent.mkdir()
    shutil.copy(old, alone)
    old.unlink()
    with pytest.raises(PotentialsInputError, match="before checkpoints recorded their model options") as err:
        finetune.load_base(alone)
    assert "\n" not in str(err.value)


def test_contradicting_explicit_options_are_an_error_naming_them(base, tmp_path):
    """model.channels=16 and cutoff=5.0 on the command line contradict the file; an agreeing option does not."""
    loaded = finetune.load_base(base / "model.pt")
    cfg = _cfg(tmp_path, tmp_path / "data", "model.channels=16", "cutoff=5.0", "model.num_layers=1")
    with pytest.raises(PotentialsInputError) as err:
        finetune.check_overrides(["model.channels=16", "cutoff=5.0", "model.num_layers=1"], cfg, loaded)
    message = str(err.value)
    assert "model.channels=16" in message and "cutoff=5.0" in message and "num_layers" not in message
    with pytest.raises(PotentialsInputError, match="model=facet"):
        finetune.check_overrides(["model=facet"], _cfg(tmp_path, tmp_path / "data", "model=facet",
                                                       "model.channels=8", "model.num_layers=1"), loaded)
    finetune.check_overrides(["model.num_layers=1", "seed=3"], cfg, loaded)


def test_reference_energies_keep_and_refit(base, tmp_path):
    """keep: the base's E0 exactly. refit: labels shifted per element (another DFT setting) move E0 by exactly
    those shifts (the fit is linear in the labels), so the shifted data is predicted as well as the original."""
    offsets = {"Cu": 0.3, "Ag": -0.2}
    plain, shifted = _data_file(tmp_path / "plain.extxyz", ["Cu", "Ag"]), _data_file(
        tmp_path / "shifted.extxyz", ["Cu", "Ag"], offsets)
    base_e0 = finetune.load_base(base / "model.pt").atomic_energies
    e0 = {}
    for name, path, mode in (("keep", shifted, "keep"), ("plain", plain, "refit"), ("shifted", shifted, "refit")):
        cfg = _cfg(tmp_path / name, tmp_path / "data", *_ase_data(path), f"init_from={base / 'model.pt'}",
                   f"finetune.reference_energies={mode}")
        _, module = build(cfg, overrides=[])
        e0[name] = {z: float(module.potential.atomic_energies[z]) for z in (CU, AG)}
    assert e0["keep"] == {z: pytest.approx(base_e0[z], abs=1e-6) for z in (CU, AG)}
    assert e0["shifted"][CU] - e0["plain"][CU] == pytest.approx(0.3, abs=1e-4)
    assert e0["shifted"][AG] - e0["plain"][AG] == pytest.approx(-0.2, abs=1e-4)
    assert e0["shifted"][CU] - base_e0[CU] == pytest.approx(0.3, abs=0.15)  # the base's own error on top


def test_refit_in_a_mix_weights_the_structures_as_training_draws_them(base, tmp_path):
    """Fine-tuning with replay: 5 new structures 0.4 eV/atom off the base's reference (weight 3) and 20 replayed
    ones (weight 1). The refitted E0 solve the weighted normal equations Aᵀ W (E − Ê) = 0 with W = w_k / n_k per
    structure (A element counts, Ê the model's energies), so the new set's offset is mostly absorbed; the
    unweighted equations, what a fit ignoring the weights solves, are far from zero."""
    replayed = _data_file(tmp_path / "replay.extxyz", ["Cu", "Ag"], seed=5, n=20)
    new = _data_file(tmp_path / "new.extxyz", ["Cu", "Ag"], {"Cu": 0.4, "Ag": 0.4}, seed=6, n=5)
    tiny = [x for x in TINY if not x.startswith("data.")]
    cfg = train_config(tmp_path / "run", tmp_path / "data", *tiny, "dtype=float64", "data=mix", "data.batch_size=4",
                       "+data@data.datasets.replay=ase", f"data.datasets.replay.path={replayed}",
                       "data.datasets.replay.split.val=0", "data.datasets.replay.split.test=0",
                       "+data@data.datasets.new=ase", f"data.datasets.new.path={new}", "+data.datasets.new.weight=3",
                       "data.datasets.new.split.val=0", "data.datasets.new.split.test=0",
                       f"init_from={base / 'model.pt'}")
    dm, module = build(cfg, overrides=[])
    graphs = [*dm.modules["replay"].splits["train"], *dm.modules["new"].splits["train"]]
    assert len(graphs) == 25
    potential = module.potential.eval()
    batch = Batch.from_data_list(graphs)
    with torch.no_grad():
        predicted = potential(batch, compute_forces=False, compute_stress=False)["energy"].double().numpy()
    residual = np.array([float(g.energy) for g in graphs]) - predicted
    counts = np.array([[int((g.z == z).sum()) for z in (CU, AG)] for g in graphs], dtype=np.float64)
    w = np.concatenate([np.full(20, (1 / 4) / 20), np.full(5, (3 / 4) / 5)])
    atoms = counts.sum(axis=1)
    weighted = counts.T @ (w * residual) / (counts.T @ (w * atoms))  # per element, eV/atom
    unweighted = counts.T @ residual / (counts.T @ atoms)
    assert np.abs(weighted).max() < 1e-8
    assert np.abs(weighted - unweighted).max() > 0.05


def test_finetune_new_element_frozen_lineage_and_info(base, tmp_path, caplog, capsys):
    """Fine-tune on Cu + Au (Au new, Ag absent) with the embedding and first layer frozen: the exported model
    knows Cu, Ag and Au; Au has a fresh embedding row that trains; frozen parameters are bit-identical in the
    checkpoint and the export; the table and the lineage are there and `potentials info` prints them."""
    from potentials.cli.main import main

    base_model = load(base / "model.pt", dtype=torch.float32)
    base_state = base_model.model.state_dict()
    run_dir = tmp_path / "ft"
    frozen = ["model.embedding.*", "model.layers.0.lin_*"]
    cfg = _cfg(run_dir, tmp_path / "data", "data.source.n_structures=20", "+data.source.elements=[Cu,Au]", "seed=1",
               f"init_from={base / 'model.pt'}", f"finetune.freeze=[{','.join(frozen)}]", "trainer.max_epochs=2")
    with caplog.at_level(logging.INFO, logger="potentials"):
        run(cfg, overrides=[])
    assert "model.layers.0" in caplog.text and "frozen" in caplog.text and "Au" in caplog.text

    exported = load(run_dir / "model.pt", dtype=torch.float32)
    assert exported.elements == [CU, AG, AU]
    assert exported.atomic_energies[AG] == base_model.atomic_energies[AG]  # absent from the data: kept
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    ema = {k: ckpt[f"ema.model.{k}"] for k in base_state}
    trained = {k: ckpt[f"potential.model.{k}"] for k in base_state}
    frozen_names = [k for k in base_state if k.startswith(("embedding.", "layers.0.lin_"))]
    assert len(frozen_names) == 5
    for k in frozen_names:
        for weights in (trained, ema, exported.model.state_dict()):
            if k == "embedding.weight":  # the new element's row is fresh, the others the base's
                rows = [CU, AG]
                assert torch.equal(weights[k][rows], base_state[k][rows])
                assert not torch.equal(weights[k][AU], base_state[k][AU])
            else:
                assert torch.equal(weights[k], base_state[k]), k
    assert not torch.equal(trained["readout.0.weight"], base_state["readout.0.weight"])  # the rest trains

    lineage = exported.metadata["lineage"]
    assert lineage["base"]["file"] == "model.pt"
    assert lineage["base"]["sha256"] == hashlib.sha256((base / "model.pt").read_bytes()).hexdigest()
    assert lineage["base"]["config"]["model"]["channels"] == 8
    assert [d["name"] for d in lineage["datasets"]] == ["emt", "emt"]
    assert lineage["datasets"][0]["config"]["source"]["elements"] == ["Cu", "Ag"]
    assert lineage["datasets"][1]["config"]["source"]["elements"] == ["Cu", "Au"]
    assert lineage["finetune"]["freeze"] == frozen

    capsys.readouterr()
    assert main(["info", str(run_dir / "model.pt")]) == 0
    out = capsys.readouterr().out
    assert "elements: [Cu, Ag, Au]" in out and lineage["base"]["sha256"] in out and "lineage:" in out

    caplog.clear()  # the run directory holds a checkpoint now: a rerun resumes it, and says so
    with caplog.at_level(logging.INFO, logger="potentials"):
        run(_cfg(run_dir, tmp_path / "data", "data.source.n_structures=20", "+data.source.elements=[Cu,Au]", "seed=1",
                 f"init_from={base / 'model.pt'}", f"finetune.freeze=[{','.join(frozen)}]", "trainer.max_epochs=2"),
            overrides=[])
    assert "resume wins" in caplog.text


def test_freeze_glob_matching_nothing_is_an_error(base, tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "data", *CU_AG, f"init_from={base / 'model.pt'}", "finetune.freeze=[model.nope*]")
    with pytest.raises(PotentialsInputError, match="model.nope"):
        build(cfg, overrides=[])


def test_base_of_another_format_or_damaged_is_one_paragraph(base, tmp_path):
    payload = torch.load(base / "model.pt", map_location="cpu", weights_only=True)
    payload["format_version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((base / "model.pt").read_bytes()[:2000])
    for path, expected in ((newer, "upgrade potentials"), (damaged, "damaged")):
        with pytest.raises(PotentialsInputError, match=expected) as err:
            finetune.load_base(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert np.isfinite(finetune.load_base(base / "model.pt").scale)


def test_train_py_names_a_contradicting_command_line_option(base, tmp_path):
    """Through `python train.py`, the options typed on the command line (Hydra's task overrides) are checked."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "train.py"), f"hydra.run.dir={tmp_path / 'run'}",
                           f"data_root={tmp_path / 'data'}", "logger=csv", f"init_from={base / 'model.pt'}",
                           "model.num_basis=4"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.num_basis=4" in proc.stderr and "the file's num_basis is 8" in proc.stderr


def test_every_element_embedding_starts_new_elements_as_finetune_new_elements_says():
    """EquiformerV2 embeds z in five tables (nodes, and edge source/target per block): every one keeps the base's
    rows for known elements; new ones get the fresh model's rows, their nearest known neighbour's, or the mean."""
    from potentials.models.equiformer import EquiformerV2

    options = dict(cutoff=4.0, channels=8, num_layers=1, lmax=1, mmax=1, attn_hidden_channels=8, num_heads=2,
                   attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8, num_basis=8)
    torch.manual_seed(0)
    trained = EquiformerV2(**options)
    loaded = finetune.Base(path=Path("base.pt"), kind="model", model_config={}, state=trained.state_dict(),
                           cutoff=4.0, atomic_energies={CU: -3.0, AG: -2.5}, scale=1.0, shift=0.0, physics=None)
    torch.manual_seed(1)
    model = EquiformerV2(**options)
    fresh = {name: m.weight.detach().clone() for name, m in finetune.embedding_tables(model)}
    potential, new = finetune.init_potential(copy.deepcopy(model), loaded, [CU, AU], new_elements="random")
    assert new == [AU] and potential.elements == [CU, AG, AU]
    tables = dict(finetune.embedding_tables(potential.model))
    assert len(tables) == 5
    for name, m in tables.items():
        own = trained.get_submodule(name).weight
        assert torch.equal(m.weight[[CU, AG]], own[[CU, AG]]), name
        assert torch.equal(m.weight[AU], fresh[name][AU]) and not torch.equal(m.weight[AU], own[AU]), name
    # the default: Au starts as its group-11 neighbour Ag (not as Cu, nor randomly); "mean": the known rows' mean
    for how, expected in (("nearest", lambda own: own[AG]), ("mean", lambda own: own[[CU, AG]].mean(0))):
        potential, _ = finetune.init_potential(copy.deepcopy(model), loaded, [CU, AU], new_elements=how)
        for name, m in finetune.embedding_tables(potential.model):
            own = trained.get_submodule(name).weight.double()
            assert torch.allclose(m.weight[AU], expected(own)), (how, name)
            assert torch.equal(m.weight[[CU, AG]], own[[CU, AG]]), (how, name)
    with pytest.raises(PotentialsInputError, match="finetune.new_elements='copy'"):
        finetune.init_potential(copy.deepcopy(model), loaded, [CU, AU], new_elements="copy")


@pytest.mark.parametrize(("element", "position"), [
    ("H", (1, 1)), ("He", (1, 18)), ("B", (2, 13)), ("Al", (3, 13)), ("Ar", (3, 18)), ("Sc", (4, 3)), ("Ni", (4, 10)),
    ("Ag", (5, 11)), ("Ba", (6, 2)), ("La", (6, 3)), ("Lu", (6, 3)), ("Hf", (6, 4)), ("Au", (6, 11)),
    ("Rn", (6, 18)), ("Ac", (7, 3)), ("Rf", (7, 4)), ("Og", (7, 18))])
def test_periodic_position_follows_the_18_column_table(element, position):
    from ase.data import atomic_numbers

    assert finetune.periodic_position(atomic_numbers[element]) == position


def test_nearest_known_element_prefers_the_same_group():
    from ase.data import atomic_numbers as z

    organic = [z[s] for s in "HCNO"]
    assert finetune.nearest_known(z["S"], organic) == z["O"]  # group 16
    assert finetune.nearest_known(z["Si"], organic) == z["C"]  # group 14
    assert finetune.nearest_known(z["Ni"], [z["Cu"], z["Ag"], z["Au"]]) == z["Cu"]  # one group over, same period
    assert finetune.nearest_known(z["Pt"], [z["Ni"], z["Pd"], z["Au"]]) == z["Pd"]  # same group, one period up


def test_lr_scales_give_parameter_groups_their_rate(base, tmp_path):
    """finetune.lr_scales multiplies finetune.lr for the matching parameters; an unmatched glob is an error."""
    cfg = _cfg(tmp_path, tmp_path / "data", *CU_AG, f"init_from={base / 'model.pt'}", "finetune.lr=0.002",
               "finetune.lr_scales={model.readout.*: 0.5}", "training.scheduler=constant")
    _, module = build(cfg, overrides=[])
    opt = module.configure_optimizers()
    readout = {id(p) for n, p in module.potential.named_parameters() if n.startswith("model.readout.")}
    for group in opt.param_groups:
        inside = {id(p) in readout for p in group["params"]}
        assert len(inside) <= 1
        assert group["lr"] == pytest.approx(0.001 if inside == {True} else 0.002)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        p.requires_grad for p in module.potential.parameters())
    module.lr_scales = {"model.nothing.*": 2.0}
    with pytest.raises(PotentialsInputError, match="model.nothing"):
        module.configure_optimizers()
