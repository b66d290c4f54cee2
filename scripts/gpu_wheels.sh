#!/usr/bin/env bash
# Downloads, on a machine with PyPI access, the wheels scripts/gpu_check.sh installs on a GPU machine without
# network: the runtime imports of the project that such a machine lacks (ase, vesin, hydra-core, ...), for
# CPython 3.12 on manylinux x86_64, each without its dependencies (the list below is the closure of what the
# check imports, minus what a CUDA machine with torch, lightning, torch-geometric and e3nn already has: torch,
# numpy, scipy, tqdm, packaging, torchmetrics, ...).  gpu_check.sh installs only those that are missing there.
#
#   bash scripts/gpu_wheels.sh [DIR]      # default DIR: .gpu_wheels (git-ignored); prints the total size
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.gpu_wheels}"
python="${PYTHON:-python3}"
mkdir -p "$dest"

# name==version pins keep the folder reproducible; versions as resolved for Python 3.12 when this list was made
binary=(
    "ase==3.26.0" "vesin" "hydra-core==1.3.2" "omegaconf==2.3.0" "PyYAML" "lmdb" "ijson"
    "matplotlib" "contourpy" "cycler" "fonttools" "kiwisolver" "pillow" "pyparsing" "python-dateutil" "six"
    "pytest" "pluggy" "iniconfig" "packaging" "setuptools" "wheel"
)
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
for spec in "${binary[@]}"; do
    "$python" -m pip download --quiet --dest "$dest" --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" --platform any "$spec"
done
# hydra-core pins antlr4-python3-runtime 4.9.*, published as a source archive only: built here into a pure wheel
if ! ls "$dest"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
    "$python" -m pip wheel --quiet --no-deps --wheel-dir "$dest" "antlr4-python3-runtime==4.9.3"
fi
total=$(du -sm "$dest" | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels in $dest: ${total} MiB"
if [ "$total" -ge 60 ]; then
    echo "error: $dest holds ${total} MiB, over the 60 MiB a device run carries" >&2
    exit 1
fi
