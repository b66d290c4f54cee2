"""Model files: format 3 sections round-trip for every family, older formats keep loading, unknown sections are
kept, ``kernels`` is stored; and the model contract that export relies on (potentials.models.base)."""

from __future__ import annotations

import ase.build
import pytest
import torch
from torch_geometric.data import Batch

from potentials.errors import PotentialsInputError
from potentials.export import FORMAT_VERSION, SECTIONS, UNITS, load, save
from potentials.graph import AtomicGraph
from potentials.models.base import EnergyModel
from potentials.models.egnn import EGNN
from potentials.models.equiformer import EquiformerV2
from potentials.potential import Potential
from tests.model_zoo import MODELS, config

CUTOFF = 4.0
E0 = {13: -3.1, 29: -1.2}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _potential(name: str, **kwargs) -> Potential:
    torch.manual_seed(0)
    return Potential(MODELS[name](CUTOFF), CUTOFF, atomic_energies=E0, scale=1.7, shift=0.3, **kwargs).double()


def _save_format_2(potential: Potential, path, model_config: dict, extra: dict) -> None:
    """A file in the flat layout of format 2, as potentials 0.1.0 wrote it before named sections."""
    torch.save({
        "format_version": 2,
        "package_version": "0.1.0",
        "model_config": {**model_config, **potential.model.resolved_config()},
        "model_state": {k: v.detach().cpu() for k, v in potential.model.state_dict().items()},
        "cutoff": potential.cutoff,
        "atomic_energies": {z: float(potential.atomic_energies[z]) for z in potential.elements},
        "scale": float(potential.scale),
        "shift": float(potential.shift),
        "elements": potential.elements,
        "units": UNITS,
        "extra": extra,
    }, path)


def _outputs(potential: Potential) -> dict[str, torch.Tensor]:
    atoms = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[[1, 3]] = 13
    atoms.rattle(0.1, seed=0)
    batch = Batch.from_data_list([AtomicGraph.from_atoms(atoms, CUTOFF, dtype=torch.float64)])
    return {k: v.detach() for k, v in potential.eval()(batch).items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() == {"energy", "node_energy", "forces", "stress", "virial"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_family_round_trips_in_sections(tmp_path, name):
    potential = _potential(name)
    assert isinstance(potential.model, EnergyModel)
    path = save(potential, tmp_path / "model.pt", config(name, CUTOFF), extra={"data": "emt"})
    payload = torch.load(path, weights_only=True)  # plain data only
    # no physics term on: format 3, which a format-3 reader computes the same (format 4 marks physics terms)
    single = tuple(s for s in SECTIONS if s != "ensemble")  # a single model has no ensemble section
    assert tuple(payload) == single and payload["format_version"] == 3 and FORMAT_VERSION == 5
    assert payload["physics"] == {"zbl": False, "dispersion": None, "functional": None}
    assert payload["model"]["config"]["_target_"] == config(name, CUTOFF)["_target_"]
    assert payload["model"]["state"].keys() == potential.model.state_dict().keys()
    assert payload["potential"] == {"cutoff": CUTOFF, "atomic_energies": pytest.approx(E0), "scale": pytest.approx(1.7),
                                    "shift": pytest.approx(0.3), "elements": [13, 29]}
    assert payload["runtime"] == {"kernels": "auto", "compile": False} and payload["training"] == {"data": "emt"}
    loaded = load(path, dtype="float64")
    assert type(loaded.model) is type(potential.model) and loaded.kernels == "auto"
    _assert_same(_outputs(loaded), _outputs(potential))


@pytest.mark.parametrize("name", ["egnn", "equiformer_v2"])
def test_format_2_files_load_and_give_the_same_results(tmp_path, name):
    potential = _potential(name)
    _save_format_2(potential, tmp_path / "v2.pt", config(name, CUTOFF), extra={"data": "emt", "test": {"mae": 1.0}})
    old = load(tmp_path / "v2.pt", dtype="float64")
    _assert_same(_outputs(old), _outputs(potential))
    # no runtime section: the behaviour of the version that wrote it
    assert old.kernels == "auto" and old.compiled is False
    # potential.metadata keeps what it gave for format 2 files
    meta = old.metadata
    assert meta["format_version"] == 2 and meta["package_version"] == "0.1.0" and meta["units"] == UNITS
    assert meta["elements"] == [13, 29] and meta["extra"] == meta["training"] == {"data": "emt", "test": {"mae": 1.0}}
    assert meta["model_config"] == {**config(name, CUTOFF), **potential.model.resolved_config()}
    _assert_same(_outputs(load(save(old, tmp_path / "v3.pt", meta["model_config"]), dtype="float64")),
                 _outputs(potential))


def test_format_1_equiformer_files_keep_their_grids(tmp_path):
    """Format 1 recorded no grids (node grid 4(lmax+1) at every lmax, edge grid (lmax+1) x (8 mmax + 8));
    EquiformerV2.upgrade_config restores them, and newer files record the grids they resolved."""
    cfg = {"_target_": "potentials.models.equiformer.EquiformerV2", "cutoff": CUTOFF, "num_layers": 1, "lmax": 3,
           "mmax": 2, "channels": 8, "attn_hidden_channels": 8, "num_heads": 2, "attn_alpha_channels": 4,
           "attn_value_channels": 4, "ffn_hidden_channels": 8, "edge_channels": 8, "num_basis": 8}
    assert EquiformerV2.upgrade_config(cfg, 1) == {**cfg, "grid_resolution": [16, 32], "edge_grid_resolution": [4, 24]}
    assert EquiformerV2.upgrade_config(cfg, 2) == cfg and EGNN.upgrade_config({"cutoff": 4.0}, 1) == {"cutoff": 4.0,
                                                                                         "coord_updates": False}
    small = {**cfg, "lmax": 2}  # lmax 2: node grid unchanged; the edge grid's default is now 3 x 14, it was 3 x 24
    assert EquiformerV2.upgrade_config(small, 1) == {**small, "edge_grid_resolution": [3, 24]}
    for model_cfg, node, edge, old_edge in ((cfg, (24, 48), (4, 24), (4, 24)), (small, (12, 24), (3, 14), (3, 24))):
        torch.manual_seed(0)
        model = EquiformerV2(**{k: v for k, v in model_cfg.items() if k != "_target_"})
        path = save(Potential(model, CUTOFF), tmp_path / "model.pt", model_cfg)
        config_3 = torch.load(path, weights_only=True)["model"]["config"]
        assert (config_3["grid_resolution"], config_3["edge_grid_resolution"]) == (list(node), list(edge))
        current = load(path).model
        assert (current.node_grid.res_beta, current.node_grid.res_alpha) == node
        old_node = (16, 32) if model_cfg["lmax"] == 3 else node
        _save_format_2(Potential(model, CUTOFF), tmp_path / "v1.pt", model_cfg, {})
        payload = torch.load(tmp_path / "v1.pt", weights_only=True)
        torch.save({**payload, "format_version": 1, "model_config": model_cfg}, tmp_path / "v1.pt")
        old = load(tmp_path / "v1.pt")
        assert (old.model.node_grid.res_beta, old.model.node_grid.res_alpha) == old_node
        assert (old.model.edge_grid.res_beta, old.model.edge_grid.res_alpha) == old_edge


def test_unknown_sections_are_kept_in_metadata(tmp_path):
    lineage = {"parent": "base.pt", "steps": 100}
    path = save(_potential("egnn"), tmp_path / "model.pt", config("egnn", CUTOFF), sections={"lineage": lineage})
    payload = torch.load(path, weights_only=True)
    assert payload["lineage"] == lineage
    torch.save({**payload, "annotations": {"members": 4}}, tmp_path / "newer.pt")  # as a later writer might add
    meta = load(tmp_path / "newer.pt").metadata
    assert meta["lineage"] == lineage and meta["annotations"] == {"members": 4}
    with pytest.raises(ValueError, match=r"sections \['runtime'\] are written by save\(\) itself"):
        save(_potential("egnn"), tmp_path / "x.pt", config("egnn", CUTOFF), sections={"runtime": {}})


def test_kernels_round_trip_and_bad_values_are_refused(tmp_path):
    potential = _potential("egnn", kernels="torch")
    assert potential.kernels == "torch"
    path = save(potential, tmp_path / "model.pt", config("egnn", CUTOFF))
    payload = torch.load(path, weights_only=True)
    assert payload["runtime"] == {"kernels": "torch", "compile": False}
    loaded = load(path)
    assert loaded.kernels == "torch" and loaded.metadata["runtime"] == {"kernels": "torch", "compile": False}
    loaded.kernels = "cpu"
    assert load(save(loaded, tmp_path / "cpu.pt", config("egnn", CUTOFF))).kernels == "cpu"
    with pytest.raises(PotentialsInputError, match=r"kernels must be one of 'auto', 'torch', 'cpu', got 'cuda'"):
        _potential("egnn", kernels="cuda")
    with pytest.raises(PotentialsInputError, match=r"kernels must be one of .* got 'fast'"):
        loaded.kernels = "fast"
    assert loaded.kernels == "cpu"
    torch.save({**payload, "runtime": {"kernels": "triton"}}, tmp_path / "later.pt")
    with pytest.raises(PotentialsInputError, match=r"later.pt: runtime.kernels is 'triton', .* upgrade potentials"):
        load(tmp_path / "later.pt")
    torch.save({**payload, "runtime": {}}, tmp_path / "no_kernels.pt")  # a missing key: the default
    assert load(tmp_path / "no_kernels.pt").kernels == "auto"
    torch.save({**payload, "runtime": {"kernels": "auto", "compile": "yes"}}, tmp_path / "bad_compile.pt")
    with pytest.raises(PotentialsInputError, match=r"bad_compile.pt: runtime.compile is 'yes', expected true or false"):
        load(tmp_path / "bad_compile.pt")


def test_a_damaged_file_names_what_it_lacks(tmp_path):
    path = save(_potential("egnn"), tmp_path / "model.pt", config("egnn", CUTOFF))
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "potential": {k: v for k, v in payload["potential"].items() if k != "scale"}},
               tmp_path / "damaged.pt")
    with pytest.raises(PotentialsInputError, match=r"damaged.pt: damaged model file, it has no potential.scale"):
        load(tmp_path / "damaged.pt")
    torch.save({**payload, "model": {**payload["model"], "config": {**payload["model"]["config"],
                                                                    "_target_": "torch.nn.Linear"}}},
               tmp_path / "other.pt")
    with pytest.raises(PotentialsInputError, match=r"other.pt: the model class torch.nn.Linear is not an energy"):
        load(tmp_path / "other.pt")


def test_the_contract_is_enforced():
    with pytest.raises(TypeError, match="Potential needs an EnergyModel .* got Linear"):
        Potential(torch.nn.Linear(3, 1), CUTOFF)
    with pytest.raises(ValueError, match=r"cutoff must be positive \(Å\), got 0"):
        EGNN(cutoff=0)
    with pytest.raises(NotImplementedError, match="EnergyModel does not define forward"):
        EnergyModel(CUTOFF)(None)
    assert EnergyModel(CUTOFF).resolved_config() == {} and EnergyModel.direct_forces is False
    assert EquiformerV2(cutoff=CUTOFF, num_layers=1, lmax=1, mmax=1, channels=4, direct_forces=True).direct_forces
