#!/usr/bin/env bash
# GPU check: the project on a CUDA machine without network, in about 3 minutes (5 at most).
#
#   bash scripts/gpu_wheels.sh          # first, on a machine with PyPI: the wheels it installs (.gpu_wheels/)
#   bash scripts/gpu_check.sh           # then, on the GPU machine, from the repository root
#
# Uses the machine's own torch (CUDA), lightning, torch-geometric and e3nn; installs from .gpu_wheels/ (no index)
# only the project's runtime imports that are missing there, into .gpu_site/, and the project itself without
# dependencies.  Then, on CUDA: the model contract tests (POTENTIALS_TEST_DEVICE=cuda), a 30-second training of
# each family (EGNN, Facet, EquiformerV2) with its export and demo relaxation, `potentials relax` (float32 with
# --tf32) and `potentials md` with a trained model, the inference timings of the harness's models (eager), and
# torch.compile of EGNN (optional: reported, never failing the check).  Report: gpu_report/summary.md, one log per
# step beside it.  Exit status 0 when every required step passed, 1 when one failed, 2 when the machine cannot run
# the check (no GPU, no CUDA torch, missing wheels).  docs/gpu.md describes it.
#
# Environment: PYTHON (default python3), GPU_REPORT (default gpu_report), GPU_WHEELS (default .gpu_wheels);
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (slowly), to check the script itself on a machine without GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python="${PYTHON:-python3}"
report="${GPU_REPORT:-gpu_report}"
wheels="${GPU_WHEELS:-.gpu_wheels}"

device="${GPU_CHECK_DEVICE:-cuda}"

die() { echo "gpu_check: $*" >&2; exit 2; }

# 1. fail fast where there is no GPU: before anything slow
if [ "$device" = cpu ]; then
    echo "gpu_check: GPU_CHECK_DEVICE=cpu: the steps on the CPU (a check of this script, not of a GPU)"
elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    die "no NVIDIA GPU on this machine (nvidia-smi is missing or lists no device); run the check on a GPU machine"
fi
if [ "$device" = cuda ]; then  # one torch import: the status line, or why CUDA cannot be used
    why=$("$python" -c "import torch; print('ok' if torch.cuda.is_available() else f'torch {torch.__version__} \
(CUDA {torch.version.cuda}) sees no CUDA device')" 2>&1 | tail -1)
    [ "$why" = ok ] || die "$python: $why; the check needs a CUDA build of torch and a visible GPU"
fi
[ -d "$wheels" ] || die "no wheel folder $wheels: run scripts/gpu_wheels.sh on a machine with PyPI and bring it along"

rm -rf "$report"
mkdir -p "$report"
report=$(cd "$report" && pwd)
start=$(date +%s)
declare -a rows
failed=0

# 2. the missing runtime imports, from the wheel folder, into .gpu_site (the machine's packages stay as they are)
site="$root/.gpu_site"
mkdir -p "$site"
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
missing=()
for whl in "$wheels"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    if ! "$python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
        missing+=("$whl")
    fi
done
{
    echo "installing ${#missing[@]} wheels: ${missing[*]##*/}"
    if [ ${#missing[@]} -gt 0 ]; then
        "$python" -m pip install --quiet --no-index --no-deps --target "$site" "${missing[@]}" || exit 1
    fi
    # the project itself, without dependencies (checks its packaging: configs and kernel sources included)
    "$python" -m pip install --quiet --no-index --no-deps --no-build-isolation --target "$site/project" . || exit 1
    ls "$site/project/potentials/conf/train.yaml" "$site/project/potentials/accel/grid_kernels.cpp" || exit 1
    "$python" -c "import ase, vesin, hydra, omegaconf, lightning, torch_geometric, e3nn, matplotlib, pytest, potentials"
} >"$report/install.log" 2>&1 || die "installing from $wheels failed: see $report/install.log"

record() {  # record NAME STATUS SECONDS NOTE
    rows+=("| $1 | $2 | $3 | $4 |")
    echo "gpu_check: $1: $2 (${3} s) $4"
}

run_step() {  # run_step NAME REQUIRED(1|0) TIMEOUT COMMAND...: runs in the background; `finish` collects it
    local name=$1 required=$2 limit=$3
    shift 3
    ( t0=$(date +%s); timeout "$limit" "$@" >"$report/$name.log" 2>&1; rc=$?
      echo "$rc $(( $(date +%s) - t0 )) $required" >"$report/$name.rc" ) &
}

finish() {  # finish NAME...: waits for the steps and records them
    wait
    local name rc seconds required status
    for name in "$@"; do
        read -r rc seconds required <"$report/$name.rc"
        if [ "$rc" = 0 ]; then status=pass
        elif [ "$rc" = 124 ]; then status="timed out"
        else status="fail (exit $rc)"; fi
        if [ "$rc" != 0 ] && [ "$required" = 1 ]; then failed=1; fi
        [ "$required" = 1 ] || status="$status (optional)"
        record "$name" "$status" "$seconds" "[$name.log]($name.log)"
    done
}

export POTENTIALS_DATA_ROOT="$report/data"
export MPLBACKEND=Agg WANDB_MODE=disabled
accelerator=$([ "$device" = cpu ] && echo cpu || echo gpu)
"$python" - "$device" <<'EOF' >"$report/device.txt" 2>&1
import platform, sys, torch
if sys.argv[1] == "cpu":
    print(f"CPU ({platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}")
    raise SystemExit
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
# the EMT data set once, before the three trainings share it
"$python" -c "
from potentials.datasets.emt import read
read(seed=0, n_structures=200, root='$POTENTIALS_DATA_ROOT')" >"$report/data.log" 2>&1 || true

# 3. contract tests and the three trainings, side by side (one GPU, many cores)
run_step contract 1 200 env POTENTIALS_TEST_DEVICE="$device" "$python" -m pytest -q -p no:cacheprovider \
    tests/test_model_contract.py
for model in egnn facet equiformer_v2; do
    run_step "train_$model" 1 150 "$python" train.py "model=$model" data=emt data.source.n_structures=200 \
        logger=csv "trainer.accelerator=$accelerator" trainer.max_time=00:00:00:30 trainer.max_epochs=1000 \
        trainer.enable_progress_bar=false figures=false "hydra.run.dir=$report/train_$model"
done
finish contract train_egnn train_facet train_equiformer_v2

# 4. the tools on CUDA with a trained model, and the harness's inference timings
model_pt="$report/train_egnn/model.pt"
"$python" -c "
import ase.build, ase.io
atoms = ase.build.bulk('Cu', 'fcc', a=3.7, cubic=True).repeat(3)
atoms.rattle(0.05, seed=0)
ase.io.write('$report/cu108.extxyz', atoms)" >>"$report/data.log" 2>&1
run_step relax 1 120 "$python" -m potentials.cli.main relax "$model_pt" "$report/cu108.extxyz" --device "$device" \
    --dtype float32 --tf32 --fmax 0.05 --no-progress --out "$report/relax"
run_step md 1 120 "$python" -m potentials.cli.main md "$model_pt" "$report/cu108.extxyz" --device "$device" \
    --steps 200 --temperature 300 --no-progress --out "$report/md"
run_step inference 1 150 "$python" -m benchmarks.compile_bench --device "$device" --eager-only --threads 4 \
    --models egnn-64,facet-64,eqv2-64-l2 --limit 45 --out "$report/inference"
finish relax md inference

# 5. torch.compile on CUDA (inductor + triton): optional, its compile time and speed-up
run_step compile 0 150 "$python" -m benchmarks.compile_bench --device "$device" --threads 4 --models egnn-64 \
    --limit 120 --out "$report/compile"
finish compile

{
    echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - start )) s)"
    echo
    echo "Device: $(cat "$report/device.txt")"
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    for model in egnn facet equiformer_v2; do
        [ -f "$report/train_$model/metrics.json" ] && "$python" - "$report/train_$model/metrics.json" "$model" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
test = m.get("test", {})
keep = {k: round(v, 4) for k, v in test.items() if "mae" in k}
print(f"- train {sys.argv[2]}: {m.get('num_parameters')} parameters, test {keep}")
EOF
    done
    echo
    for part in inference compile; do
        [ -f "$report/$part.md" ] && { sed 's/^# /## /' "$report/$part.md"; echo; }
    done
} >"$report/summary.md"
echo "gpu_check: report in $report/summary.md"
exit "$failed"
