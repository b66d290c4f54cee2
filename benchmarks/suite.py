"""What a benchmark run measures: models at matched sizes, structures, dtypes, step counts.

Three frameworks are measured by the same protocol (a fresh worker subprocess each, same threads and
structures): ``mace`` and ``fairchem`` in their own venvs, ``ours`` in the main venv.

To add one of this project's models, add an entry to ``OURS_MODELS``: a label and the ``_target_``
import path with constructor keyword arguments (``cutoff`` and ``avg_num_neighbors`` are filled in).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

CUTOFF = 5.0

#: Values of ``--device`` (the same words as the workers' ``device`` request field).
DEVICES = ("auto", "cpu", "cuda")

#: mace.modules.ScaleShiftMACE; correlation 3, 2 interactions, 8 Bessel, polynomial cutoff 5, max_ell 3.
MACE_MODELS: dict[str, dict] = {
    "mace-64": {"channels": 64, "max_L": 1, "correlation": 3, "r_max": CUTOFF, "num_interactions": 2},
    "mace-128": {"channels": 128, "max_L": 1, "correlation": 3, "r_max": CUTOFF, "num_interactions": 2},
}

#: fairchem eSCNMDBackbone, 2 layers as MACE's 2 interactions: MLP_EFS_Head (conservative forces and stress)
#: or, for "direct", MLP_Energy_Head + Linear_Force_Head (forces from the network, no stress). Its defaults: gate
#: activation in the messages, S² grid feed-forward network, grids of 2(lmax+1) × (2mmax+3) points.
FAIRCHEM_MODELS: dict[str, dict] = {
    "escn-md-64-l2": {"sphere_channels": 64, "hidden_channels": 64, "edge_channels": 64, "num_distance_basis": 64,
                      "lmax": 2, "mmax": 2, "num_layers": 2, "cutoff": CUTOFF, "forces": "conservative"},
    "escn-md-128-l2": {"sphere_channels": 128, "hidden_channels": 128, "edge_channels": 128,
                       "num_distance_basis": 128, "lmax": 2, "mmax": 2, "num_layers": 2, "cutoff": CUTOFF,
                       "forces": "conservative"},
    # eSCN-MD with EquiformerV2's separable S² activation in its messages instead of its default gate
    "escn-md-64-l2-s2": {"sphere_channels": 64, "hidden_channels": 64, "edge_channels": 64, "num_distance_basis": 64,
                         "lmax": 2, "mmax": 2, "num_layers": 2, "cutoff": CUTOFF, "forces": "conservative",
                         "act_type": "s2"},
    "escn-md-64-l2-direct": {"sphere_channels": 64, "hidden_channels": 64, "edge_channels": 64,
                             "num_distance_basis": 64, "lmax": 2, "mmax": 2, "num_layers": 2, "cutoff": CUTOFF,
                             "forces": "direct"},
}

#: nequip's own builders with their documented defaults. "nequip-s": the "S" preset of nequip's foundation-model
#: sizes (PresetNequIPGNNModel: 2 layers as MACE's 2 interactions, l_max 1, features [128 scalars, 64 vectors],
#: no odd parity, 32 type-embedding features, radial MLP 1 x 128). "nequip-32": NequIPGNNModel's argument defaults
#: (4 layers, l_max 1, parity, 32 features). "allegro-64-l1": AllegroModel's defaults (2 layers, 64 scalar and 16
#: tensor features) at l_max 1, 8-Bessel two-body embedding. Cutoff 5 Å and 8 Bessels for all, as for the others.
NEQUIP_MODELS: dict[str, dict] = {
    "nequip-s": {"builder": "preset", "preset": "S", "r_max": CUTOFF},
    "nequip-32": {"builder": "nequip", "r_max": CUTOFF},
    "allegro-64-l1": {"builder": "allegro", "l_max": 1, "r_max": CUTOFF},
}

_EQV2 = {"_target_": "potentials.models.equiformer.EquiformerV2", "cutoff": CUTOFF, "num_layers": 2, "lmax": 2,
         "mmax": 2, "channels": 64, "attn_hidden_channels": 64, "ffn_hidden_channels": 64, "edge_channels": 64,
         "num_basis": 64}
_FACET = {"_target_": "potentials.models.facet.Facet", "cutoff": CUTOFF, "lmax": 1, "num_layers": 2}

#: This project's models (the hook): label → {"_target_": class path, **constructor kwargs}.
#: Widths match the peers: EquiformerV2 as eSCN-MD 64 (lmax = mmax = 2, 2 layers); Facet as MACE 64/128 (L = 1,
#: 2 interactions). The Facet ablations swap the spline radial for a Bessel + MLP radial and/or the grid layer
#: for a gate.
OURS_MODELS: dict[str, dict] = {
    "egnn-64": {"_target_": "potentials.models.egnn.EGNN", "cutoff": CUTOFF, "channels": 64, "num_layers": 3},
    # the paper's coordinate updates between the three layers
    "egnn-64-coords": {"_target_": "potentials.models.egnn.EGNN", "cutoff": CUTOFF, "channels": 64, "num_layers": 3,
                       "coord_updates": True},
    "eqv2-64-l2": _EQV2,
    "eqv2-64-l2-gate": {**_EQV2, "use_gate_act": True, "use_grid_mlp": False},
    "eqv2-64-l2-gate-gridffn": {**_EQV2, "use_gate_act": True},  # eSCN-MD's choice: gated messages, grid FFN
    # eSCN-MD's choices and its grid size (6 x 7 = 42 points instead of our 12 x 24): the same computation as
    # eSCN-MD-64 plus the attention, and a rotation error of ~1e-2 instead of ~1e-7
    "eqv2-64-l2-gate-gridffn-6x7": {**_EQV2, "use_gate_act": True, "grid_resolution": [6, 7]},
    # the paper's S² activation on eSCN-MD's grid sizes (both grids 6 x 7)
    "eqv2-64-l2-6x7": {**_EQV2, "grid_resolution": [6, 7], "edge_grid_resolution": [6, 7]},
    "facet-64": {**_FACET, "channels": 64},
    "facet-128": {**_FACET, "channels": 128},
    "facet-64-l2": {**_FACET, "channels": 64, "lmax": 2},  # features up to L = 2
    "facet-64-mlp": {**_FACET, "channels": 64, "radial": "mlp"},
    "facet-64-gate": {**_FACET, "channels": 64, "self_interaction": "gate"},
    "facet-64-mlp-gate": {**_FACET, "channels": 64, "radial": "mlp", "self_interaction": "gate"},
}

#: Per-model changes to the equal-time training recipe (everything else is the shared recipe). EGNN has no
#: normalisation layers; at the shared learning rate of 0.01 its force error jumps back up within minutes.
#: EquiformerV2 (a Transformer; the paper trains at 2e-4 to 4e-4): after 200 s on MD17 ethanol, test force MAE
#: 70.7 meV/Å at lr 1e-2, 39.7 at 4e-3, 27.0 at 2e-3 (energy 25, 20, 50 meV). Facet (lmax 2) at 1e-2 spikes
#: (validation force MAE back up 1.6-2.5x for minutes on malonaldehyde, paracetamol, salicylic acid); rMD17
#: validation MAE after 600 s at 1e-2 / 5e-3 / 2.5e-3: malonaldehyde 41.0 / 21.7 / 21.0, paracetamol
#: 65.9 / 37.4 / 36.5, aspirin 46.1 / 41.5 / - meV/Å (docs/benchmarks.md).
_FAMILY_LR = {"egnn-": 5e-3, "facet-": 5e-3, "eqv2-": 2e-3}
TRAINING_OVERRIDES: dict[str, dict] = {label: {"lr": lr} for label in OURS_MODELS
                                       for prefix, lr in _FAMILY_LR.items() if label.startswith(prefix)}

#: The fields of the equal-time recipe that ``--recipe`` may change for this project's models (the peers keep their
#: documented defaults): peak learning rate, EMA decay, batch size, MACE's second stage on or off and its rate.
RECIPE_FIELDS: dict[str, type] = {"lr": float, "ema_decay": float, "batch_size": int, "stage_two": bool,
                                  "stage_two_lr": float}


def parse_recipe(text: str) -> dict:
    """``"lr=3e-3,ema_decay=0.999"`` → ``{"lr": 0.003, "ema_decay": 0.999}``, checked against
    :data:`RECIPE_FIELDS`."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in RECIPE_FIELDS:
            raise ValueError(f"--recipe item {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{sorted(RECIPE_FIELDS)}")
        kind = RECIPE_FIELDS[key]
        try:
            if kind is bool:
                if value.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.strip().lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            raise ValueError(f"--recipe item {item!r}: {value!r} is not a valid {kind.__name__}") from None
    return out


#: The models the ``--quick`` run measures (one per framework).
QUICK_MODELS = ("mace-64", "escn-md-64-l2", "nequip-s", "egnn-64")

#: The models of the roofline part unless ``--models`` names others (this project's models only).
ROOFLINE_MODELS = ("egnn-64", "facet-64", "eqv2-64-l2")


@dataclass
class Settings:
    """Everything a run depends on; written at the top of the report."""

    quick: bool = False
    threads: int = 2
    #: torch device of every worker: "cpu" (the default, so reports of CPU machines stay comparable), "cuda", or
    #: "auto" (cuda where the worker's torch sees a GPU, else the CPU); each result records the device it used.
    device: str = "cpu"
    dtypes: tuple[str, ...] = ("float32", "float64")
    infer_structures: tuple[str, ...] = ("si64", "cu500", "ethanol", "oc20")
    warmup: int = 5  # TorchScript's profiling executor (MACE/e3nn) optimises only after a few calls
    steps: int = 10
    train_warmup: int = 2
    train_steps: int = 5
    budget_s: float = 600.0
    md17_split: tuple[int, int, int] = (950, 50, 1000)
    frameworks: tuple[str, ...] = ("ours", "mace", "fairchem", "nequip")
    models: tuple[str, ...] = field(default_factory=tuple)
    accuracy_models: tuple[str, ...] = field(default_factory=tuple)  # empty: every selected model but fairchem
    omp_wait_policy: str = "PASSIVE"
    malloc: str = "tuned"  # glibc allocator settings of every worker: "tuned" (potentials.accel.allocator) or "system"
    datasets: str = ""  # accuracy part: real-data sets (benchmarks.datasets.parse_datasets); empty: MD17 ethanol
    eval_points: int = 8  # evaluations per equal-time training run, log-spaced in time
    jobs: int = 1  # accuracy part: (set, model) cells trained at once, each worker with ``threads`` threads
    recipe: dict = field(default_factory=dict)  # --recipe: changes to our models' equal-time recipe (RECIPE_FIELDS)
    seed: int = 0  # accuracy part: seed of every model's initialisation and batch order (peers too)
    report_variant: str = ""  # non-empty: reports go to <part>-<variant>.* (a side report) instead of <part>.*
    rounds: int = 1  # repetitions of the inference part (models interleaved); the report takes medians
    roofline_structures: tuple[str, ...] = ("cu500", "si64")  # the roofline part's structures (--structures)
    roofline_steps: int = 4  # timed steps per model, structure and step kind (after one warm-up)

    @classmethod
    def make(cls, quick: bool, **overrides) -> Settings:
        base = cls(quick=quick)
        if quick:
            base.dtypes = ("float32",)
            base.infer_structures = ("si64", "cu500")
            base.warmup, base.steps = 3, 5
            base.train_warmup, base.train_steps = 1, 3
            base.budget_s = 60.0
            base.md17_split = (200, 20, 200)
            base.models = QUICK_MODELS
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        if base.device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {base.device!r}")
        return base


def all_models() -> dict[str, tuple[str, dict]]:
    """Label → (framework, model config), over all frameworks."""
    out = {}
    for framework, table in (("mace", MACE_MODELS), ("fairchem", FAIRCHEM_MODELS), ("nequip", NEQUIP_MODELS),
                             ("ours", OURS_MODELS)):
        for label, cfg in table.items():
            out[label] = (framework, cfg)
    return out


def selected_models(settings: Settings) -> dict[str, tuple[str, dict]]:
    """The models of the run: the ``models`` filter (all if empty) within the ``frameworks`` filter."""
    models = all_models()
    unknown = [m for m in (*settings.models, *settings.accuracy_models) if m not in models]
    if unknown:
        raise ValueError(f"unknown model label(s) {unknown}; known: {sorted(models)}")
    chosen = settings.models or tuple(models)
    return {label: models[label] for label in chosen if models[label][0] in settings.frameworks}


def roofline_models(settings: Settings) -> dict[str, dict]:
    """This project's models measured by the roofline part: those of ``--models`` if given, else
    :data:`ROOFLINE_MODELS`."""
    chosen = settings.models or ROOFLINE_MODELS
    unknown = [m for m in chosen if m not in all_models()]
    if unknown:
        raise ValueError(f"unknown model label(s) {unknown}; known: {sorted(all_models())}")
    return {label: OURS_MODELS[label] for label in chosen if label in OURS_MODELS}


def ours_available(cfg: dict) -> str | None:
    """None if the model class's module can be found, else the reason it cannot be measured."""
    module = cfg["_target_"].rpartition(".")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"module {module} not found"
