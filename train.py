"""Train an interatomic potential: `python train.py [group=option ...] [key=value ...]`.

Examples:
    python train.py                                   # EGNN on the embedded EMT metals set
    python train.py data=md17 data.path=ethanol.npz   # MD17 / rMD17
    python train.py data=ase data.path=train.extxyz model=egnn logger=tensorboard
    python train.py hydra.run.dir=runs/mine           # choose the run directory (rerun to resume)
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from potentials.accel import tune_allocator
from potentials.errors import PotentialsInputError
from potentials.training.launch import external_launch_overrides, print_input_error
from potentials.training.report import demo_relax, print_summary
from potentials.training.run import register_resolvers, run

register_resolvers()
#: Errors about the user's input: printed as one paragraph (HYDRA_FULL_ERROR=1 shows the traceback instead).
INPUT_ERRORS = (PotentialsInputError, FileNotFoundError, MissingMandatoryValue)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
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
        summary["demo_relax"] = demo_relax(summary["model"], summary["_demo_atoms"], cfg)
    print_summary(summary)


if __name__ == "__main__":
    try:
        sys.argv += external_launch_overrides(sys.argv[1:], os.environ)
    except PotentialsInputError as error:
        print_input_error(error)
        sys.exit(2)
    main()
