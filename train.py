"""Train an interatomic potential from a source checkout: ``python train.py ...`` is ``potentials train ...``.

Examples:
    python train.py                                   # EGNN on the embedded EMT metals set
    python train.py data=md17 data.path=ethanol.npz   # MD17 / rMD17
    python train.py hydra.run.dir=runs/mine           # choose the run directory (rerun to resume)
    python train.py --help                            # config groups and options (potentials/conf)
"""

from potentials.cli.train import main

if __name__ == "__main__":
    main()
