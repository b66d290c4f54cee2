"""Train an interatomic potential: `python train.py [group=option ...] [key=value ...]`.

Examples:
    python train.py                                   # EGNN on the embedded EMT metals set
    python train.py data=md17 data.path=ethanol.npz   # MD17 / rMD17
    python train.py data=ase data.path=train.extxyz model=egnn logger=tensorboard
    python train.py hydra.run.dir=runs/mine           # choose the run directory (rerun to resume)
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from potentials.training.report import demo_relax, print_summary
from potentials.training.run import register_resolvers, run

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    summary = run(cfg)
    if cfg.demo_relax and summary.get("model"):
        summary["demo_relax"] = demo_relax(summary["model"], summary["_demo_atoms"], cfg)
    print_summary(summary)


if __name__ == "__main__":
    main()
