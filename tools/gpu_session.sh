#!/usr/bin/env bash
# Issue 15's GPU run as one prepared script: the whole suite on CUDA, then gpu_check --full.
#
#   here, with network:     bash tools/gpu_session.sh prepare     # -> gpu_wheels/ (git-ignored)
#   on the lent GPU:        bash tools/gpu_session.sh run         # -> $OUT (or gpu_out/)
#     through the device tool: run(command="bash tools/gpu_session.sh run",
#                                  carry=["gpu_wheels"], timeout_s=570)
#
# The GPU machine (../shared/gpu/README.md) has no network and Python 3.12 with torch, triton,
# numpy, Pillow, safetensors, tqdm, pytest, pytest-benchmark and pytest-xdist, but no nvtx and
# no diffusers.  `prepare` builds the fastdiff wheel and downloads cp312 / pure-Python wheels of
# what may be missing there; `run` installs fastdiff and whichever of the others the machine
# lacks into a private target directory (nothing of the machine's own packages is replaced),
# then, each step with its own time limit and log under $OUT:
#   env.log            GPU, driver, versions, where fastdiff is imported from
#   suite.log          the whole test suite on CUDA, one line per test and long tracebacks,
#                      from outside the checkout (so the installed wheel is what runs),
#                      SUITE_WORKERS workers with SUITE_THREADS torch threads each; at its time
#                      limit pytest gets SIGINT, so what ran is still summarised; suite.xml
#   gpu_check/         benchmarks/gpu_check.py --full: CUDA tests, graph == eager, benchmarks
#                      against the diffusers anchors, a log and JSON per part; its table
#                      (one row per part and per benchmark) ends gpu_check.log
# Times (seconds) default to a 570 s call: SUITE_S=210, CHECK_S=330.  SUITE_K selects tests
# with pytest -k (a rerun: SUITE_K="name or name" CHECK_S=0, which skips gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=$REPO/gpu_wheels
# diffusers 0.30.0 is the oldest release the suite has run with; its hub must predate 0.26's
# removals.  Both only land where the machine has none of its own.
EXTRA_WHEELS=(nvtx "diffusers==0.30.0" "huggingface_hub==0.25.2" importlib_metadata zipp scipy)

prepare() {
    rm -rf "$WHEELS" && mkdir -p "$WHEELS" || return 1
    python -m pip wheel --quiet --no-deps -w "$WHEELS" "$REPO" || return 1
    python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any \
        -d "$WHEELS" "${EXTRA_WHEELS[@]}" || return 1
    du -sh "$WHEELS" && ls "$WHEELS"
}

# The distribution name of a wheel file (PEP 427: name-version-...whl, name with underscores).
wheel_dist() { local f=${1##*/}; echo "${f%%-*}"; }

installed() {  # is distribution $1 importable by the machine's own Python already?
    python - "$1" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
m.version(sys.argv[1])
EOF
}

run() {
    local out=${OUT:-$REPO/gpu_out} site
    mkdir -p "$out"
    site=$(mktemp -d)/site
    {
        for whl in "$WHEELS"/*.whl; do
            dist=$(wheel_dist "$whl")
            if [ "$dist" != fastdiff ] && installed "$dist"; then
                echo "keep the machine's $dist"
                continue
            fi
            echo "install $whl"
            python -m pip install --quiet --no-index --no-deps --target "$site" "$whl"
        done
    } > "$out/install.log" 2>&1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
    local tmp
    tmp=$(mktemp -d)  # every step runs outside the checkout's root
    (
        cd "$tmp" || exit 1
        { nvidia-smi; python - <<'EOF'; } > "$out/env.log" 2>&1
import sys, torch, triton, fastdiff
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
print("triton", triton.__version__, "fastdiff", fastdiff.__file__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
EOF
        OMP_NUM_THREADS=${SUITE_THREADS:-2} MKL_NUM_THREADS=${SUITE_THREADS:-2} \
            timeout -s INT -k 20 "${SUITE_S:-210}" python -m pytest "$REPO/tests" \
            -n "${SUITE_WORKERS:-7}" -p no:cacheprovider --tb=long -rfE -v \
            --junitxml="$out/suite.xml" ${SUITE_K:+-k "$SUITE_K"} \
            > "$out/suite.log" 2>&1
        echo "suite exit $?" >> "$out/suite.log"
        [ "${CHECK_S:-330}" -gt 0 ] || exit 0
        timeout "$(( ${CHECK_S:-330} + 20 ))" python "$REPO/benchmarks/gpu_check.py" --full \
            --budget-s "${CHECK_S:-330}" --out "$out/gpu_check" > "$out/gpu_check.log" 2>&1
        echo "gpu_check exit $?" >> "$out/gpu_check.log"
    )
    tail -n 3 "$out/suite.log"
    [ ! -f "$out/gpu_check.log" ] || tail -n 40 "$out/gpu_check.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash tools/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
