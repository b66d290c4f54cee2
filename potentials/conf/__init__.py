"""The Hydra config tree of ``potentials train`` (``train.yaml`` and its groups), shipped inside the package.

It is a package so that an installed copy is found without the source tree; the yaml files are package data.
"""

from pathlib import Path

#: Folder of ``train.yaml`` and the config groups (data/, model/, training/, trainer/, logger/, experiment/).
CONFIG_DIR = Path(__file__).resolve().parent
