#!/usr/bin/env bash
# Every GPU figure that README.md and bench/RESULTS.md leave unrun, in one budgeted call on one GPU.
#
#   bash bench/gpu_all.sh --prepare                               # once, here: PyPI reachable, project installed
#   bash bench/gpu_all.sh --out "$OUT" --budget-s 540 --pack      # on the GPU machine, from the repository root
#   bash bench/gpu_all.sh --dry-run --out /tmp/plan               # anywhere: the plan and its checks, no model
# Options: --out DIR (out/gpu-all), --budget-s S (540), --pack, --steps NAME,NAME (a subset), --work DIR
# (/tmp/sdpo-gpu-all), --carry DIR (out/gpu-carry), --python PY; --prepare [--also PKG] [--device-python 3.12].
#
# The steps (bench/gpu_all.py's plan, in priority order): the packed training step vs TRL with compiled
# FlexAttention, scoring vs TRL's precompute with FlexAttention, the training step with the per-pair loop, the GPU
# replication's quick mode, vLLM (where vLLM imports), scoring with the loop, sdpo truthfulqa with flex and with the
# loop, and the DDP/FSDP2 check. Each gets a timeout cut from what is left of --budget-s (counted from this
# script's start, set-up included); a step that would not fit is skipped with its reason. Results: OUT/summary.json
# and OUT/summary.md after every step, each step's log and JSON in OUT/steps/ (or OUT/steps.tar.gz with --pack,
# for a device that returns few files). Exits 0 with the summary whatever the steps did.
#
# Set-up on the GPU machine: it reaches no package registry, so what its image lacks (trl, datasets, dill,
# multiprocess, gguf) travels as wheels in the carry folder that --prepare fills (out/gpu-carry, ignored by git:
# name it in the device call's carry), with ../shared/data and the bundled model's config and tokenizer. The
# model's weights (a 98 MB GGUF) do not fit in one call: where 'bundled' does not resolve there, the steps run on
# random weights of its shape (timings hold; quality figures do not), and the summary says which.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
START=$(date +%s)

OUT_DIR=out/gpu-all
WORK=/tmp/sdpo-gpu-all
CARRY=out/gpu-carry
BUDGET=540
DEVICE_PY=3.12  # the device image's python3 (see the device notes); the carried wheels are for it
PY=${PYTHON:-}
MODE=run
PASS=()
ALSO=()

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --carry) CARRY=$2; shift 2 ;;
        --budget-s) BUDGET=$2; shift 2 ;;
        --steps) PASS+=(--steps "$2"); shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --device-python) DEVICE_PY=$2; shift 2 ;;
        --also) ALSO+=("$2"); shift 2 ;;  # --prepare: one more wheel, or another version of one
        --pack) PASS+=(--pack); shift ;;
        --dry-run) MODE=dry-run; shift ;;
        --prepare) MODE=prepare; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_all.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$CARRY" in /*) ;; *) CARRY=$REPO/$CARRY ;; esac

# The project's venv where there is one (here, CI), else the image's python3 (the GPU machine: no venv travels).
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python; else PY=$(command -v python3); fi
fi

if [ "$MODE" = prepare ]; then
    mkdir -p "$CARRY/wheels"
    rm -f "$CARRY"/wheels/*.whl
    # The versions this checkout is tested with (pure-Python wheels; multiprocess's is per Python version); --also
    # NAME adds one at this checkout's version, --also NAME==VERSION adds or replaces one at that version.
    specs=()
    for pkg in trl datasets dill multiprocess gguf ${ALSO[@]+"${ALSO[@]}"}; do
        name=${pkg%%==*}
        kept=()
        for spec in ${specs[@]+"${specs[@]}"}; do [ "${spec%%==*}" = "$name" ] || kept+=("$spec"); done
        specs=(${kept[@]+"${kept[@]}"})
        if [ "$pkg" = "$name" ]; then
            pkg=$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
        fi
        specs+=("$pkg")
    done
    for spec in "${specs[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PY" --implementation cp \
            --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$CARRY/wheels" "$spec"
    done
    if [ -d "$REPO/../shared/data" ]; then
        # the shared folder is read-only: make the copy writable, so that the next --prepare can replace it
        if [ -d "$CARRY/data" ]; then chmod -R u+w "$CARRY/data"; rm -rf "$CARRY/data"; fi
        cp -r "$REPO/../shared/data" "$CARRY/data"
        chmod -R u+w "$CARRY/data"
    else
        echo "gpu_all.sh: no ../shared/data here: the data-reading steps will fail on the device" >&2
    fi
    "$PY" bench/gpu_all.py prepare --carry "$CARRY"
    du -sh "$CARRY"
    echo "device call: command 'bash bench/gpu_all.sh --out \$OUT --budget-s 540 --pack'," \
        "carry [\"${CARRY#"$REPO"/}\"], timeout_s 600"
    exit 0
fi

# Set-up, counted in the budget. Offline: the GPU machine reaches no hub, and a lookup would only wait.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor  # compiled flex kernels shared by the steps of this run
PATH=$(dirname "$PY"):$PATH  # accelerate's launcher beside the interpreter
SITE=
packages="already importable"
if ! "$PY" -c "import trl, datasets" 2>/dev/null; then
    packages="missing (no wheels in $CARRY/wheels: run --prepare where PyPI is reachable)"
    if [ "$MODE" = run ] && compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
        mkdir -p "$WORK"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
            "$CARRY"/wheels/*.whl; then
            SITE=$WORK/site
            packages="installed from $CARRY/wheels into $SITE"
        else
            packages="pip install of $CARRY/wheels failed"
        fi
    elif compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
        packages="not importable here; the run installs $CARRY/wheels"
    fi
fi
export PYTHONPATH=$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}

# The benches and the replication read ../shared/data beside the checkout; a device call carries only the repo.
data="../shared/data present"
if [ ! -d "$REPO/../shared/data" ]; then
    data="../shared/data missing"
    if [ -d "$CARRY/data" ]; then
        if [ "$MODE" = run ]; then
            if mkdir -p "$REPO/../shared" && ln -s "$CARRY/data" "$REPO/../shared/data"; then
                data="../shared/data linked to $CARRY/data"
            fi
        else
            data="../shared/data missing; the run links $CARRY/data"
        fi
    fi
fi

GPU_ALL_ENV=$("$PY" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    python "$PY" packages "$packages" data "$data" carry "$CARRY")
export GPU_ALL_ENV
if [ "$MODE" = dry-run ]; then PASS+=(--dry-run); fi
exec "$PY" bench/gpu_all.py run --out "$OUT_DIR" --work "$WORK" --carry "$CARRY" --budget-s "$BUDGET" \
    --started-at "$START" ${PASS[@]+"${PASS[@]}"}
