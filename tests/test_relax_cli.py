"""`potentials relax` on folders and multi-frame files: every structure relaxed, named, written and tabulated."""

from __future__ import annotations

import json

import ase.build
import ase.io
import numpy as np
import pytest

from potentials.calculator import PotentialCalculator
from potentials.cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rattled(kind: str, seed: int) -> ase.Atoms:
    atoms = ase.build.bulk("Cu", "fcc", a=3.63, cubic=kind == "cubic")
    atoms = atoms.repeat(2) if kind == "primitive" else atoms
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_relax_a_folder_and_a_multi_frame_file(cu_model, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    ase.io.write(folder / "a.cif", _rattled("cubic", 1))
    ase.io.write(folder / "POSCAR", _rattled("primitive", 2), format="vasp")
    ase.io.write(folder / "frames.extxyz", [_rattled("cubic", 3), _rattled("primitive", 4)])
    (folder / "notes.txt").write_text("not a structure\n")
    (folder / ".hidden.cif").write_text("ignored\n")
    elsewhere = tmp_path / "a.xyz"  # same stem as a.cif: gets a distinct name
    ase.io.write(elsewhere, _rattled("cubic", 5), format="extxyz")
    out = tmp_path / "relaxed"

    code = main(["relax", str(cu_model), str(folder), str(elsewhere), "--fmax", "0.03", "--out", str(out),
                 "--format", "extxyz"])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    assert "skipped" in captured.err and "notes.txt" in captured.err and ".hidden" not in captured.err
    assert "relaxing" in captured.err and "5/5" in captured.err  # tqdm progress bar over structures
    names = ["inputs_poscar", "a", "frames_0", "frames_1", "a-2"]
    table = captured.out.splitlines()
    assert table[0].split()[:4] == ["structure", "atoms", "conv", "steps"]
    assert [line.split()[0] for line in table[2:7]] == names
    assert "5/5 converged" in captured.out and "1 unreadable files skipped" in captured.out

    summary = json.loads((out / "summary.json").read_text())
    assert [row["structure"] for row in summary] == names
    calc = PotentialCalculator.from_file(cu_model, dtype="float64")
    for row in summary:
        relaxed = ase.io.read(out / f"{row['structure']}_relaxed.extxyz")
        assert (out / f"{row['structure']}.traj").is_file()
        assert relaxed.get_potential_energy() == pytest.approx(row["energy_eV"])  # extxyz keeps the energy
        relaxed.calc = calc
        assert np.linalg.norm(relaxed.get_forces(), axis=1).max() < 0.03
        assert row["converged"] and row["initial_fmax_eV_per_A"] > row["fmax_eV_per_A"]
    assert summary[2]["atoms"] == 4 and summary[3]["atoms"] == 8  # the two frames of frames.extxyz


def test_relax_errors_name_the_problem(cu_model, tmp_path, capsys):
    bad = tmp_path / "bad.cif"
    bad.write_text("data_broken\n_cell_length_a oops\n")
    with pytest.raises(SystemExit, match="cannot read .*bad.cif"):
        main(["relax", str(cu_model), str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no such file or folder"):
        main(["relax", str(cu_model), str(tmp_path / "missing.cif"), "--out", str(tmp_path / "o")])
    molecule = tmp_path / "cu2.xyz"
    ase.io.write(molecule, ase.Atoms("Cu2", positions=[[0, 0, 0], [2.4, 0, 0]]))
    # a structure that cannot be relaxed is reported, and the exit code says so
    assert main(["relax", str(cu_model), str(molecule), "--cell", "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "structure cu2: --cell relaxes the lattice" in capsys.readouterr().err
