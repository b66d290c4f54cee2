"""Physics terms in Potential: ZBL against LAMMPS, D3(BJ) against the reference dftd3, derivatives, files, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.fd import calculate_numerical_stress
from ase.data import atomic_numbers, covalent_radii
from torch_geometric.data import Batch

from potentials.calculator import PotentialCalculator
from potentials.datasets import emt
from potentials.datasets.stats import compute_stats
from potentials.errors import PotentialsInputError
from potentials.export import FORMAT_VERSION, load, save
from potentials.graph import AtomicGraph
from potentials.physics import ZBL, PhysicsConfig, baseline
from potentials.potential import Potential
from tests.tiny_model import CUTOFF, MODEL_CONFIG, _model

PAIRS = {"H-H": ("H", "H"), "C-O": ("C", "O"), "Cu-Cu": ("Cu", "Cu"), "Ta-Ta": ("Ta", "Ta"), "In-P": ("In", "P")}


def _potential(symbols, seed: int = 0, **physics) -> Potential:
    """Untrained tiny EGNN in float64 with the given physics terms."""
    torch.manual_seed(seed)
    e0 = {atomic_numbers[s]: -1.0 for s in symbols}
    return Potential(_model(), CUTOFF, e0, scale=0.3, physics=physics or None).double().eval()


def _run(potential: Potential, atoms: Atoms, stress: bool = False) -> dict[str, torch.Tensor]:
    batch = Batch.from_data_list([AtomicGraph.from_atoms(atoms, potential.cutoff, dtype=torch.float64)])
    out = potential(batch, compute_stress=stress)
    return out if potential.training else {k: v.detach() for k, v in out.items()}


def _dimer(a: str, b: str, r: float) -> Atoms:
    return Atoms(f"{a}{b}", positions=[[0.0, 0.0, 0.0], [r, 0.0, 0.0]])


def _radii(a: str, b: str) -> tuple[float, float]:
    rsum = covalent_radii[atomic_numbers[a]] + covalent_radii[atomic_numbers[b]]
    return 0.5 * rsum, 0.8 * rsum


def test_zbl_equals_lammps_pair_style_zbl_below_both_switches(test_data):
    ref = json.loads((test_data / "zbl" / "lammps_dimers.json").read_text())["dimers"]
    compared = set()
    for name, (a, b) in PAIRS.items():
        plain, with_zbl = _potential([a, b]), _potential([a, b], zbl=True)
        inner = _radii(a, b)[0]
        for row in (row for row in ref if row["pair"] == name and row["r"] < inner):
            atoms = _dimer(a, b, row["r"])
            on, off = _run(with_zbl, atoms), _run(plain, atoms)
            energy = float((on["energy"] - off["energy"]).detach())  # the same network: the difference is the ZBL term
            force = (on["forces"] - off["forces"])[1].numpy()
            assert energy == pytest.approx(row["energy"], rel=1e-9), (name, row["r"])
            np.testing.assert_allclose(force, row["force_on_2"], rtol=1e-9, atol=1e-9 * abs(row["force_on_2"][0]))
            compared.add(name)
    assert compared == set(PAIRS)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_dimers_are_monotonically_repulsive_down_to_a_tenth_of_an_angstrom(name):
    a, b = PAIRS[name]
    potential = _potential([a, b], zbl=True)
    inner, _ = _radii(a, b)
    # from the inner switch radius (ZBL fully on) inwards; in the switch an untrained network's own slope may win
    distances = np.linspace(0.1, inner, 40)
    out = [_run(potential, _dimer(a, b, r)) for r in distances]
    energies = np.array([float(o["energy"]) for o in out])
    push = np.array([float(o["forces"][1, 0]) for o in out])  # force on the second atom, along +x
    assert (np.diff(energies) < 0).all(), energies
    assert (push > 0).all(), push


def test_energy_forces_and_stress_are_continuous_across_the_switch():
    a, b = "Cu", "Cu"
    inner, outer = _radii(a, b)
    zbl = ZBL(CUTOFF).double()
    z = torch.tensor([29])
    for edge in (inner, outer):
        r = torch.tensor([edge - 1e-8, edge + 1e-8], dtype=torch.float64, requires_grad=True)
        e = zbl.pair_energy(z.repeat(2), z.repeat(2), r)
        (g,) = torch.autograd.grad(e.sum(), r, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), r)
        assert abs(float(e[1] - e[0])) < 1e-5 and abs(float(g[1] - g[0])) < 1e-3 and abs(float(h[1] - h[0])) < 1e-2
    # forces by central differences of the full potential's energy, in and around the switch
    potential = _potential([a], zbl=True)
    for r in np.linspace(inner - 0.2, outer + 0.2, 9):
        atoms = _dimer(a, b, r)
        force = float(_run(potential, atoms)["forces"][1, 0])
        h = 1e-5
        ep = float(_run(potential, _dimer(a, b, r + h))["energy"])
        em = float(_run(potential, _dimer(a, b, r - h))["energy"])
        assert force == pytest.approx(-(ep - em) / (2 * h), rel=1e-6, abs=1e-7), r
    # stress of a periodic cell whose nearest pairs lie in the switch region, against ASE's numeric stress
    atoms = bulk("Cu", "fcc", a=2.6, cubic=True)  # nearest neighbours at 1.84 Å, between 1.32 and 2.11 Å
    atoms.rattle(0.03, seed=3)
    atoms.cell[0, 1] = 0.2
    calc = PotentialCalculator(potential, dtype="float64")
    atoms.calc = calc
    stress = atoms.get_stress()
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), rtol=1e-5, atol=1e-6)
    # with ZBL on, the stress is not that of the network alone: the term is in the strain derivative
    assert np.abs(stress - PotentialCalculator(_potential([a]), dtype="float64").get_stress(atoms)).max() > 1e-3


def test_zbl_is_twice_differentiable_for_training_on_forces():
    zbl = ZBL(CUTOFF).double()
    z1, z2 = torch.tensor([29, 49, 1]), torch.tensor([29, 15, 1])
    r = torch.tensor([1.5, 1.6, 0.35], dtype=torch.float64, requires_grad=True)  # inside each pair's switch
    assert torch.autograd.gradgradcheck(lambda x: zbl.pair_energy(z1, z2, x), (r,))
    # a force loss has parameter gradients through the network, and they see the ZBL forces in the prediction
    atoms = bulk("Cu", "fcc", a=2.8) * (2, 1, 1)  # nearest pairs at 1.98 Å, inside the Cu-Cu switch
    atoms.rattle(0.1, seed=1)
    grads = []
    for physics in ({"zbl": True}, {}):
        potential = _potential(["Cu"], **physics).train()
        _run(potential, atoms)["forces"].pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in potential.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0 and not torch.allclose(grads[0], grads[1])


def _ethanol(test_data) -> Atoms:
    d = np.load(test_data / "md17" / "md17_ethanol_first2000.npz")
    return Atoms(numbers=d["z"], positions=d["R"][7])


def _reference_d3(atoms: Atoms) -> dict[str, np.ndarray]:
    """The reference implementation (dftd3, the s-dftd3 Python API): PBE-D3(BJ), two-body; eV, eV/Å, eV/Å³."""
    from dftd3.interface import DispersionModel, RationalDampingParam
    from tad_mctc.units import energy, length

    periodic = bool(atoms.pbc.all())
    model = DispersionModel(atoms.numbers, atoms.positions * length.AA2AU,
                            atoms.cell.array * length.AA2AU if periodic else None,
                            np.array([periodic] * 3) if periodic else None)
    res = model.get_dispersion(RationalDampingParam(method="pbe", atm=False), grad=True)
    out = {"energy": res["energy"] * energy.AU2EV, "forces": -res["gradient"] * energy.AU2EV * length.AA2AU}
    if periodic:
        out["stress"] = res["virial"] * energy.AU2EV / atoms.get_volume()
    return out


@pytest.mark.parametrize("system", ["ethanol", "periodic"])
def test_d3bj_equals_the_reference_implementation(test_data, system):
    if system == "ethanol":
        atoms = _ethanol(test_data)
    else:  # a small sheared cell: many periodic images within the D3 cutoffs, far beyond the model cutoff
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=1)
        atoms.cell[0, 1] = 0.3
    symbols = sorted(set(atoms.get_chemical_symbols()))
    plain, with_d3 = _potential(symbols), _potential(symbols, dispersion="d3bj", functional="pbe")
    periodic = system == "periodic"
    on, off = _run(with_d3, atoms, stress=periodic), _run(plain, atoms, stress=periodic)
    ref = _reference_d3(atoms)
    assert float(on["energy"] - off["energy"]) == pytest.approx(ref["energy"], rel=1e-6)
    np.testing.assert_allclose((on["forces"] - off["forces"]).numpy(), ref["forces"], rtol=1e-5, atol=1e-7)
    if periodic:
        np.testing.assert_allclose((on["stress"] - off["stress"])[0].numpy(), ref["stress"], rtol=1e-5, atol=1e-9)


def test_model_file_records_physics_and_refuses_removing_trained_terms(tmp_path, test_data):
    trained = _potential(["C", "H", "O"], zbl=True, dispersion="d3bj", functional="PBE")
    path = save(trained, tmp_path / "model.pt", MODEL_CONFIG)
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == 4 and FORMAT_VERSION >= 4  # physics files stay readable by format 4
    section = payload["physics"]
    assert section["zbl"] is True and section["dispersion"] == "d3bj" and section["functional"] == "pbe"
    assert section["zbl_switch"]["inner"] == 0.5 and section["d3"]["a1"] == pytest.approx(0.4289)
    loaded = load(path, dtype="float64")
    assert loaded.physics == trained.physics
    atoms = _ethanol(test_data)
    torch.testing.assert_close(_run(loaded, atoms)["forces"], _run(trained, atoms)["forces"])
    with pytest.raises(PotentialsInputError, match="trained with the ZBL"):
        PotentialCalculator.from_file(path, zbl=False)
    with pytest.raises(PotentialsInputError, match="cannot be removed"):
        PotentialCalculator.from_file(path, dispersion=None)
    with pytest.raises(PotentialsInputError, match="functional"):
        PotentialCalculator.from_file(path, functional="b3lyp")
    assert PotentialCalculator.from_file(path, zbl=True).potential.physics == trained.physics
    # a file without a physics section (an older version's) has no terms
    del payload["physics"]
    payload["format_version"] = 3
    torch.save(payload, tmp_path / "old.pt")
    assert not load(tmp_path / "old.pt").physics.any


def test_adding_d3_at_inference_to_a_model_trained_without_it(tmp_path, test_data):
    path = save(_potential(["C", "H", "O"]), tmp_path / "plain.pt", MODEL_CONFIG)
    assert torch.load(path, weights_only=True)["format_version"] == 3  # no term: readable by format-3 readers
    atoms = _ethanol(test_data)
    plain = PotentialCalculator.from_file(path, dtype="float64")
    added = PotentialCalculator.from_file(path, dtype="float64", dispersion="d3bj", functional="pbe")
    assert added.potential.physics.dispersion == "d3bj" and not added.potential.physics.zbl
    difference = added.get_potential_energy(atoms) - plain.get_potential_energy(atoms)
    assert difference == pytest.approx(_reference_d3(atoms)["energy"], rel=1e-6)
    with pytest.raises(PotentialsInputError, match="needs physics.functional"):
        PotentialCalculator.from_file(path, dispersion="d3bj")


def test_training_statistics_are_those_of_the_labels_minus_the_physics_terms():
    frames = emt.generate(seed=2, n_structures=8, elements=("Cu", "Ag"))
    plain = [AtomicGraph.from_atoms(a, CUTOFF, dtype=torch.float64) for a in frames]
    config = PhysicsConfig(zbl=True, dispersion="d3bj", functional="pbe")
    term = baseline(config, CUTOFF)
    # labels = EMT + physics terms; the statistics with the baseline must be those of the EMT labels
    shifted = []
    for g in plain:
        e, f = term(g)
        assert abs(e) > 1e-3
        h = g.clone()
        h.energy = g.energy + e
        h.forces = g.forces + torch.from_numpy(f)
        shifted.append(h)
    want, got = compute_stats(plain), compute_stats(shifted, baseline=term)
    assert got.atomic_energies == pytest.approx(want.atomic_energies, rel=1e-9, abs=1e-9)
    assert got.force_rms == pytest.approx(want.force_rms, rel=1e-9)
    assert compute_stats(shifted).force_rms != pytest.approx(want.force_rms, rel=1e-3)


def test_train_config_declares_physics_off_and_build_passes_it(tmp_path):
    from potentials.training.run import build
    from tests.train_config import train_config

    cfg = train_config(tmp_path / "run", tmp_path / "data")
    assert dict(cfg.physics) == {"zbl": False, "dispersion": None, "functional": None}
    cfg = train_config(tmp_path / "run", tmp_path / "data", "physics.zbl=true", "data.source.n_structures=12",
                       "model=egnn", "model.num_layers=1", "model.channels=8")
    dm, module = build(cfg)
    assert module.potential.physics.zbl and not module.potential.physics.dispersion
    want = compute_stats(dm.splits["train"], baseline=baseline(module.potential.physics, cfg.cutoff))
    assert dict(cfg.data_stats.atomic_energies) == pytest.approx({str(k): v for k, v in want.atomic_energies.items()})
    assert math.isclose(float(module.potential.scale), want.force_rms, rel_tol=1e-6)
