"""Bad input end to end (the table in README.md): each case is a clear error naming file, record and field, or a
counted and reported skip, through the same path `train.py` takes (config → adapter → data module → model)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from torch_geometric.data import Batch

from potentials.calculator import PotentialCalculator
from potentials.datasets import aselmdb
from potentials.errors import PotentialsInputError
from potentials.export import FORMAT_VERSION, load
from potentials.training.module import CHECKPOINT_FORMAT
from potentials.training.run import _report_labels, build, run
from tests.tiny_model import random_model
from tests.train_config import train_config

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["model.channels=8", "model.num_layers=1"]
RMD17 = "rmd17/rmd17_ethanol_reduced_100.xyz"
OC20 = "oc20/oc20_is2res_random1447590.traj"
MPTRJ = "mptrj/mptrj_sample_11_frames.json"


def _config(tmp_path: Path, *overrides: str):
    return train_config(tmp_path, tmp_path / "data", "logger=csv", *SMALL_MODEL, *overrides)


def _build(tmp_path: Path, *overrides: str):
    return build(_config(tmp_path, *overrides))


def _ethanol(test_data: Path) -> list[ase.Atoms]:
    """The real rMD17 frames (kcal/mol, kcal/mol/Å) with their labels."""
    return ase.io.read(test_data / RMD17, ":")


def _write(tmp_path: Path, frames: list[ase.Atoms], name: str = "frames.extxyz") -> Path:
    path = tmp_path / name
    ase.io.write(path, frames)
    return path


def _relabel(atoms: ase.Atoms, **results) -> None:
    old = dict(atoms.calc.results) if atoms.calc is not None else {}
    old.update(results)
    atoms.calc = SinglePointCalculator(atoms, **{k: v for k, v in old.items() if v is not None})


def _as_ase_data(path: Path) -> list[str]:
    return ["data=ase", f"data.path={path}", "data.source.energy_unit=kcal/mol"]


@pytest.mark.parametrize(("frame", "field", "value"), [(7, "energy", np.nan), (3, "forces", np.inf)])
def test_non_finite_label_names_file_frame_field(test_data, tmp_path, frame, field, value):
    frames = _ethanol(test_data)[:20]
    if field == "energy":
        _relabel(frames[frame], energy=value)
    else:
        forces = frames[frame].get_forces().copy()
        forces[2, 1] = value
        _relabel(frames[frame], forces=forces)
    path = _write(tmp_path, frames)
    where = rf"file 'frames.extxyz', frame {frame}, field '{field}'"
    with pytest.raises(PotentialsInputError, match=rf"{where}: value is not finite"):
        _build(tmp_path, *_as_ase_data(path))


def test_non_finite_positions_name_the_frame(test_data, tmp_path):
    frames = _ethanol(test_data)[:20]
    frames[11].positions[4, 0] = np.nan
    with pytest.raises(PotentialsInputError, match=r"frames.extxyz frame 11: positions or cell hold NaN or inf"):
        _build(tmp_path, *_as_ase_data(_write(tmp_path, frames)))


def test_missing_graph_store_is_named(tmp_path):
    with pytest.raises(PotentialsInputError, match=r"data=store: graph store '.*nowhere' does not exist; build it"):
        _build(tmp_path, "data=store", f"data.path={tmp_path / 'nowhere'}")


def test_missing_forces_and_stress_are_left_out_of_the_loss_and_counted(test_data, tmp_path, caplog):
    frames = _ethanol(test_data)[:20]
    for atoms in frames[:5]:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())  # energy only
    dm, module = _build(tmp_path, *_as_ase_data(_write(tmp_path, frames)), "data.split.val=0", "data.split.test=0")
    with caplog.at_level(logging.INFO, logger="potentials"):
        _report_labels(dm.splits["train"], module.loss_fn)
    assert "energy 20, forces 15, stress 0" in caplog.text
    assert "5 of 20 training structures have no forces label" in caplog.text
    batch = Batch.from_data_list(dm.splits["train"][:8])  # 5 without forces, 3 with
    out = module.potential(batch, compute_stress=False)
    labelled = batch.has_forces[batch.batch]
    expected = (out["forces"][labelled] - batch.forces[labelled]).pow(2).mean()
    torch.testing.assert_close(module.loss_fn(out, batch)["forces"], expected)  # nothing filled in for the five
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    dm, module = _build(tmp_path, *_as_ase_data(_write(tmp_path, frames)), "training.loss.energy_weight=0")
    with pytest.raises(PotentialsInputError, match="no training structure has a label the loss uses"):
        _report_labels(dm.splits["train"], module.loss_fn)


@pytest.mark.parametrize(("cell", "message"), [
    ([[8.0, 0, 0], [0, 8.0, 0], [8.0, 8.0, 0]], "zero volume"),
    ([[8.0, 0, 0], [0, 8.0, 0], [8.0, 8.0, 1e-4]], "nearly singular"),
])
def test_degenerate_cell_names_the_frame(test_data, tmp_path, cell, message):
    frames = ase.io.read(test_data / OC20, ":6")
    frames[4].set_cell(cell)
    with pytest.raises(PotentialsInputError, match=rf"frames.extxyz frame 4: .*{message}"):
        _build(tmp_path, "data=ase", f"data.path={_write(tmp_path, frames)}")


def test_overlapping_atoms_name_frame_and_atoms(test_data, tmp_path):
    frames = _ethanol(test_data)[:10]
    frames[5].positions[3] = frames[5].positions[0] + [0.05, 0.0, 0.0]
    where = "frames.extxyz frame 5, field 'positions'"
    with pytest.raises(PotentialsInputError, match=rf"{where}: atoms 0 and 3 are 0.05 Å"):
        _build(tmp_path, *_as_ase_data(_write(tmp_path, frames)))


def test_isolated_atoms_train_and_predict(test_data, tmp_path):
    """An atom with no neighbour (a lone atom, or one far from a molecule) is valid: energy E0 + its one-body term."""
    frames = _ethanol(test_data)[:12]
    far = frames[0].copy()
    far += ase.Atoms("H", positions=[[30.0, 0.0, 0.0]])
    _relabel(far, energy=frames[0].get_potential_energy() - 313.0,
             forces=np.vstack([frames[0].get_forces(), np.zeros((1, 3))]))
    lone = ase.Atoms("O", positions=[[0.0, 0.0, 0.0]])
    lone.calc = SinglePointCalculator(lone, energy=-47000.0, forces=np.zeros((1, 3)))
    dm, module = _build(tmp_path, *_as_ase_data(_write(tmp_path, [*frames, far, lone])), "data.split.val=0",
                        "data.split.test=0")
    graphs = [g for g in dm.splits["train"] if g.num_atoms in (1, 10)]
    assert len(graphs) == 2 and all(g.edge_index.shape[1] >= 0 for g in graphs)
    batch = Batch.from_data_list(graphs)
    out = module.potential(batch, compute_stress=False, create_graph=True)
    loss = module.loss_fn(out, batch)["total"]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in module.potential.parameters()
                                        if p.grad is not None)
    lone_forces = out["forces"][batch.ptr[batch.num_atoms.tolist().index(1)]]
    assert torch.equal(lone_forces, torch.zeros(3, dtype=lone_forces.dtype))
    calc = PotentialCalculator(module.potential, dtype="float32")
    atom = ase.Atoms("H", positions=[[0.0, 0.0, 0.0]])
    atom.calc = calc
    assert np.isfinite(atom.get_potential_energy()) and np.array_equal(atom.get_forces(), np.zeros((1, 3)))


def test_unknown_element_at_inference_is_named(test_data, tmp_path):
    calc = PotentialCalculator.from_file(random_model(tmp_path / "cu.pt", ["Cu"]))
    ethanol = _ethanol(test_data)[0]
    ethanol.calc = calc
    with pytest.raises(PotentialsInputError, match=r"never saw: H, C, O \(trained on: Cu\)"):
        ethanol.get_potential_energy()


def test_empty_splits(tmp_path):
    emt = ["data.source.n_structures=6", "data.batch_size=2"]
    with pytest.raises(PotentialsInputError, match="the train split is empty"):
        _build(tmp_path, *emt, "data.split.val=3", "data.split.test=3")
    summary = run(_config(tmp_path / "run", *emt, "data.split.val=0", "data.split.test=0", "trainer.max_epochs=1",
                          "trainer.max_time=null", "trainer.enable_progress_bar=false", "demo_relax=false"))
    assert summary["best_checkpoint"].endswith("best.ckpt") and "test" not in summary  # chosen by train/loss
    assert Path(summary["model"]).is_file()


def test_kcal_per_mol_energies_read_as_ev_warn(test_data, tmp_path):
    path = test_data / RMD17
    with pytest.warns(UserWarning, match=r"100 of 100 energies .*kcal/mol"):
        _build(tmp_path, "data=ase", f"data.path={path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _build(tmp_path, "data=ase", f"data.path={path}", "data.source.energy_unit=kcal/mol")


def _truncate(path: Path, out: Path) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[:len(data) // 2])
    return out


def _flip_bytes(path: Path, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def _aselmdb(test_data: Path, out: Path) -> Path:
    full = out.with_name("full.aselmdb")
    aselmdb.write(full, ase.io.read(test_data / OC20, ":8"))
    return _truncate(full, out)


CORRUPTED = {
    "npz truncated": (lambda d, t: _truncate(d / "md17/md17_ethanol_first2000.npz", t / "md17.npz"),
                      ["data=md17"], r"file 'md17.npz'.*cannot be read as a numpy .npz"),
    "npz damaged": (lambda d, t: _flip_bytes(d / "md17/md17_ethanol_first2000.npz", t / "md17.npz"),
                    ["data=md17"], r"file 'md17.npz'.*damaged"),
    "extxyz truncated": (lambda d, t: _truncate(d / RMD17, t / "rmd17.extxyz"),
                         ["data=ase"], r"file 'rmd17.extxyz'.*ASE cannot read this file"),
    "json truncated": (lambda d, t: _truncate(d / MPTRJ, t / "mptrj.json"),
                       ["data=mptrj", "data.source.progress=false"], r"file 'mptrj.json': not valid JSON near byte"),
    "aselmdb truncated": (lambda d, t: _aselmdb(d, t / "oc20.aselmdb"),
                          ["data=oc20_s2ef", "data.source.referenced=false", "data.source.progress=false"],
                          r"file 'oc20.aselmdb'.*LMDB file is truncated"),
}


@pytest.mark.parametrize("case", list(CORRUPTED))
def test_corrupted_files_name_the_file(test_data, tmp_path, case):
    """Truncated or damaged files fail with the file named, never a crash (LMDB would otherwise die of SIGBUS)."""
    make, data, message = CORRUPTED[case]
    path = make(test_data, tmp_path)
    with pytest.raises(PotentialsInputError, match=message):
        _build(tmp_path, *data, f"data.path={path}")


def test_invalid_records_can_be_skipped_counted_and_reported(test_data, tmp_path):
    sample = json.loads((test_data / MPTRJ).read_text())
    mp_id = next(iter(sample))
    frame_id = next(iter(sample[mp_id]))
    sample[mp_id][frame_id]["force"] = sample[mp_id][frame_id]["force"][:-1]  # one atom short
    path = tmp_path / "mptrj.json"
    path.write_text(json.dumps(sample))
    data = ["data=mptrj", f"data.path={path}", "data.source.progress=false", "data.split.val=0", "data.split.test=0"]
    with pytest.raises(PotentialsInputError, match=rf"{frame_id}.*force"):
        _build(tmp_path, *data)
    dm, _ = _build(tmp_path, *data, "data.source.skip_invalid=true")
    assert len(dm.splits["train"]) == 10
    report = (tmp_path / "skipped_mptrj.tsv").read_text()
    assert frame_id in report and "# skipped 1 of 11 records" in report


def test_model_file_of_another_version_or_kind(tmp_path):
    path = random_model(tmp_path / "cu.pt", ["Cu"])
    payload = torch.load(path, weights_only=True)
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "format_version": FORMAT_VERSION + 1}, newer)
    with pytest.raises(PotentialsInputError,
                       match=rf"newer.pt: written by potentials .* file format {FORMAT_VERSION + 1}; .* upgrade"):
        load(newer)
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "loops": object()}, checkpoint)  # a Lightning checkpoint is not a model file
    with pytest.raises(PotentialsInputError, match="last.ckpt: not a readable potentials model file"):
        load(checkpoint)
    with pytest.raises(PotentialsInputError, match="trained with a cutoff of 4.5 Å and cannot be used with 6.0 Å"):
        PotentialCalculator.from_file(path, cutoff=6.0)
    assert load(path, cutoff=4.5).cutoff == 4.5


def test_checkpoint_of_another_version_model_or_cutoff(tmp_path):
    _, module = _build(tmp_path, "data.source.n_structures=8")
    good = {"state_dict": module.state_dict(), "potentials": {"checkpoint_format": CHECKPOINT_FORMAT, "cutoff": 5.0}}
    module.on_load_checkpoint(good)
    module.checkpoint_source = "resume=old.ckpt"
    with pytest.raises(PotentialsInputError, match=r"resume=old.ckpt was written .* checkpoint format 99"):
        module.on_load_checkpoint({**good, "potentials": {"checkpoint_format": 99, "package_version": "9.0"}})
    with pytest.raises(PotentialsInputError, match=r"trained with cutoff 6.0 Å but the config asks for 5.0 Å"):
        module.on_load_checkpoint({**good, "potentials": {"checkpoint_format": 1, "cutoff": 6.0}})
    _, wider = _build(tmp_path, "data.source.n_structures=8", "model.channels=16")
    with pytest.raises(PotentialsInputError, match=r"holds a different model .*checkpoint \(\d+, 16\), config \(\d+, 8"
                       ):
        module.on_load_checkpoint({**good, "state_dict": wider.state_dict()})
    with pytest.raises(PotentialsInputError, match=r"model.cutoff=6.0 Å differs from cutoff=5.0 Å"):
        _build(tmp_path, "data.source.n_structures=8", "model.cutoff=6.0")


def test_train_py_reports_input_errors_in_one_paragraph(test_data, tmp_path):
    """No Hydra traceback for a user error; HYDRA_FULL_ERROR=1 still shows it."""
    path = _truncate(test_data / RMD17, tmp_path / "rmd17.extxyz")
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", "data=ase",
           f"data.path={path}", "logger=csv"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()
    assert error[0].startswith("error: data=ase: file 'rmd17.extxyz': ASE cannot read this file") and len(error) == 2
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR=1" in error[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HYDRA_FULL_ERROR": "1"}, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "PotentialsInputError" in proc.stderr
