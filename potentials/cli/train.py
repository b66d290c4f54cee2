"""``potentials train [group=option ...] [key=value ...]``: train an interatomic potential (Hydra's command line).

The configs are the package's own (``potentials/conf``); run directories (``outputs/...``, ``multirun/...``) and
the default data root (``data/``) are relative to the working directory. ``--help`` lists the config groups,
``--cfg job`` prints the composed config, ``--multirun`` sweeps. Examples::

    potentials train                                   # EGNN on the embedded EMT metals set
    potentials train data=md17 data.path=ethanol.npz   # MD17 / rMD17
    potentials train data=ase data.path=train.extxyz model=egnn logger=tensorboard
    potentials train hydra.run.dir=runs/mine           # choose the run directory (rerun to resume)

``python train.py ...`` in a source checkout is the same command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from potentials.conf import CONFIG_DIR
from potentials.errors import PotentialsInputError
from potentials.training.launch import external_launch_overrides, print_input_error

#: Errors about the user's input: printed as one paragraph (HYDRA_FULL_ERROR=1 shows the traceback instead).
INPUT_ERRORS = (PotentialsInputError, FileNotFoundError, MissingMandatoryValue)


def train(cfg: DictConfig) -> None:
    """One training run from a composed config: fit, test, export, then the summary on stdout (rank 0)."""
    from potentials.accel import tune_allocator
    from potentials.training.report import demo_relax, print_summary
    from potentials.training.run import run

    tune_allocator()
    try:
        summary = run(cfg)
    except INPUT_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print_input_error(error)
        sys.exit(2)
    if not summary.get("_global_zero", True):
        return  # under DDP, rank 0 reports
    if cfg.demo_relax and summary.get("model"):
        summary["demo_relax"] = demo_relax(summary["model"], summary["_demo_atoms"], cfg,
                                           device=summary.get("_device", "cpu"))
    print_summary(summary)


def main(argv: Sequence[str] | None = None, subcommand: Sequence[str] = ()) -> None:
    """Hydra's command line on ``argv`` (default ``sys.argv[1:]``), with the package's ``conf/train.yaml``.

    Args:
        argv: Hydra arguments: overrides and flags such as ``--help``, ``--cfg job``, ``--multirun``.
        subcommand: the words between the program and ``argv`` (``("train",)`` for ``potentials train``). Lightning
            starts the other processes of a ``trainer=ddp`` run by rerunning ``sys.argv``, so it must hold them.
    """
    import hydra

    from potentials.training.run import register_resolvers

    program = sys.argv[0]
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args += external_launch_overrides(args, os.environ)
    except PotentialsInputError as error:
        print_input_error(error)
        sys.exit(2)
    rerun = [program, *subcommand, *args]
    register_resolvers()

    def task(cfg: DictConfig) -> None:
        sys.argv = rerun
        train(cfg)

    # this module's name, `train`, is Hydra's job name: <run dir>/train.log, as for `python train.py`
    hydra_main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(task)
    sys.argv = [program, *args]  # Hydra parses sys.argv[1:]
    try:
        hydra_main()
    finally:
        sys.argv = rerun


if __name__ == "__main__":
    main()
