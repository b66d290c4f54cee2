"""Each model family trains with its own recipe (conf/recipe): what `python train.py model=...` composes is the
configuration and learning rate the accuracy benchmark measured for that family."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from benchmarks import suite

#: family config → the benchmark label whose measured configuration it is
BENCHMARKED = {"egnn": "egnn-64", "facet": "facet-64-l2", "equiformer_v2": "eqv2-64-l2"}
#: the shared rate of the benchmark's recipe (benchmarks/workers/ours_worker.py), unless TRAINING_OVERRIDES say
BENCHMARK_LR = 1e-2


def _compose(*overrides: str):
    with initialize_config_module("potentials.conf", version_base=None):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("family", sorted(BENCHMARKED))
def test_family_defaults_are_the_benchmarked_configuration(family):
    cfg = _compose(f"model={family}")
    label = BENCHMARKED[family]
    bench = suite.OURS_MODELS[label]
    assert cfg.model._target_ == bench["_target_"]
    for key, value in bench.items():
        if key in ("_target_", "cutoff"):
            continue
        assert cfg.model[key] == value, f"model={family}: {key}={cfg.model[key]}, benchmarked with {value}"
    assert cfg.cutoff == bench["cutoff"]
    assert cfg.training.lr == pytest.approx(suite.TRAINING_OVERRIDES.get(label, {}).get("lr", BENCHMARK_LR))


def test_presets_inherit_their_family_rate():
    rates = {m: _compose(f"model={m}").training.lr
             for m in ("egnn", "facet", "equiformer_v2", "equiformer_v2_31M", "equiformer_v2_83M", "facet_mptrj")}
    # the Transformer trains at a lower rate than the two message-passing families
    assert rates["equiformer_v2"] < min(rates["egnn"], rates["facet"])
    assert rates["equiformer_v2_31M"] == rates["equiformer_v2_83M"] == rates["equiformer_v2"]
    assert rates["facet_mptrj"] == rates["facet"]
    # the rest of the training group is untouched by a recipe
    assert _compose("model=facet").training.loss == _compose("model=egnn").training.loss


def test_command_line_and_experiments_still_win():
    assert _compose("model=facet", "training.lr=3e-3").training.lr == pytest.approx(3e-3)
    exp = _compose("+experiment=mptrj_facet")
    assert exp.model._target_.endswith("Facet")
    assert exp.training.lr == _compose("model=facet").training.lr
    assert exp.training.loss.stress_weight == 100.0
