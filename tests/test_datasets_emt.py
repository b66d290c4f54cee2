"""The embedded EMT dataset: determinism, caching, label correctness, structure kinds and the stress sign."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from potentials.datasets import emt


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """A 30-structure set read back from its cache (three full cycles of the structure kinds)."""
    return emt.read(root=tmp_path_factory.mktemp("data"), n_structures=30, seed=11)


def _same(a, b) -> bool:
    return (
        len(a) == len(b)
        and np.array_equal(a.numbers, b.numbers)
        and np.array_equal(a.positions, b.positions)
        and np.array_equal(a.cell[:], b.cell[:])
        and a.calc.results.keys() == b.calc.results.keys()
        and all(np.array_equal(a.calc.results[k], b.calc.results[k]) for k in a.calc.results)
    )


def test_generation_is_deterministic():
    first = emt.generate(seed=5, n_structures=6)
    again = emt.generate(seed=5, n_structures=6)
    other = emt.generate(seed=6, n_structures=6)
    assert all(_same(a, b) for a, b in zip(first, again, strict=True))
    assert not any(np.array_equal(a.positions, b.positions) for a, b in zip(first, other, strict=True))
    # Structure i depends on (seed, i) only: a smaller set is a prefix of a larger one.
    assert all(_same(a, b) for a, b in zip(emt.generate(seed=5, n_structures=3), first, strict=False))


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    images = emt.read(root=tmp_path, n_structures=4, seed=2)
    files = list((tmp_path / "emt").glob("emt_*.extxyz"))
    assert len(files) == 1 and images[0].info["source"] == files[0].name
    assert [a.info["frame"] for a in images] == [0, 1, 2, 3]

    def fail(**options):
        raise AssertionError("the cache should have been read, not regenerated")

    monkeypatch.setattr(emt, "generate", fail)
    again = emt.read(root=tmp_path, n_structures=4, seed=2, elements=("Au", "Cu", "Ag"))  # same set
    assert all(_same(a, b) for a, b in zip(images, again, strict=True))
    with pytest.raises(AssertionError, match="regenerated"):  # other options → another cache file
        emt.read(root=tmp_path, n_structures=4, seed=3)
    monkeypatch.undo()
    explicit = emt.read(tmp_path / "mine.extxyz", n_structures=2, seed=2)
    assert (tmp_path / "mine.extxyz").is_file()
    assert all(_same(a, b) for a, b in zip(explicit, images, strict=False))


def test_labels_equal_a_fresh_emt_calculation(small_set):
    for atoms in small_set[:6]:
        fresh = atoms.copy()
        fresh.calc = EMT()
        assert atoms.get_potential_energy() == pytest.approx(fresh.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), fresh.get_forces(), atol=1e-6)
        if atoms.pbc.all():
            np.testing.assert_allclose(atoms.get_stress(), fresh.get_stress(), atol=1e-8)


def test_structure_kinds_sizes_and_forces(small_set):
    kinds = {k: [a for a in small_set if a.info["config_type"] == k] for k in ("bulk", "vacancy", "slab")}
    assert all(kinds.values()), "every kind occurs in a 30-structure set"
    for slab in kinds["slab"]:
        assert slab.pbc.tolist() == [True, True, False]
        assert set(slab.calc.results) == {"energy", "forces"}  # no stress for a slab
        z = slab.positions[:, 2]
        assert slab.cell[2, 2] - (z.max() - z.min()) > 10.0  # vacuum between periodic images
    for atoms in kinds["bulk"] + kinds["vacancy"]:
        assert atoms.pbc.all() and set(atoms.calc.results) == {"energy", "forces", "stress"}
    sizes = [len(a) for a in small_set]
    assert 1 <= min(sizes) and max(sizes) <= 32 and 8 <= np.median(sizes) <= 32
    assert set(np.concatenate([a.get_chemical_symbols() for a in small_set])) <= {"Cu", "Ag", "Au"}
    assert any(len(set(a.numbers)) > 1 for a in small_set)  # alloys are present
    forces = np.concatenate([a.get_forces() for a in small_set])
    assert 0.2 < np.sqrt(np.mean(forces**2)) < 1.2  # moderate forces, eV/Å


def test_stress_label_is_the_strain_derivative_of_energy(small_set):
    """σ = (1/V)·∂E/∂ε by central differences of EMT energies (ASE sign), against the cached label."""
    atoms = next(a for a in small_set if a.info["config_type"] == "bulk" and len(a) > 1)
    h = 1e-5

    def energy(eps):
        strained = atoms.copy()
        strained.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
        strained.calc = EMT()
        return strained.get_potential_energy()

    volume = atoms.get_volume()
    xx = np.zeros((3, 3))
    xx[0, 0] = h
    xy = np.zeros((3, 3))
    xy[0, 1] = xy[1, 0] = h
    sigma_xx = (energy(xx) - energy(-xx)) / (2 * h * volume)
    sigma_xy = (energy(xy) - energy(-xy)) / (2 * h * volume) / 2  # both ε_xy and ε_yx moved
    stress = atoms.get_stress()  # Voigt: xx, yy, zz, yz, xz, xy
    assert stress[0] == pytest.approx(sigma_xx, abs=1e-6)
    assert stress[5] == pytest.approx(sigma_xy, abs=1e-6)


@pytest.mark.parametrize("symbols", [["Cu"] * 4, ["Cu", "Au", "Au", "Ag"]])
def test_compressed_cell_has_negative_stress_trace(symbols):
    a = emt.lattice_constant(symbols)
    atoms = bulk("Cu", "fcc", a=a, cubic=True)
    atoms.set_chemical_symbols(symbols)
    atoms.set_cell(atoms.cell * 0.98, scale_atoms=True)  # −2% strain
    labelled = emt.label(atoms.copy())
    direct = atoms.copy()
    direct.calc = EMT()
    np.testing.assert_allclose(labelled.get_stress(), direct.get_stress(), atol=1e-12)
    assert labelled.get_stress()[:3].sum() < 0  # compressed → negative (compressive) under ASE's sign


def test_elements_are_configurable_and_checked():
    images = emt.generate(n_structures=3, elements=("Ni", "Al"))
    assert set(np.concatenate([a.get_chemical_symbols() for a in images])) <= {"Ni", "Al"}
    with pytest.raises(ValueError, match=r"\['Fe'\] not supported.*'Cu'"):
        emt.generate(n_structures=1, elements=("Cu", "Fe"))
