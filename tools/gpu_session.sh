#!/usr/bin/env bash
# Issue 15's GPU run as one prepared script: the whole suite on CUDA, then gpu_check --full.
#
#   here, with network:     bash tools/gpu_session.sh prepare     # -> gpu_wheels/ (git-ignored)
#   on the lent GPU:        bash tools/gpu_session.sh run         # -> $OUT (or gpu_out/)
#     through the device tool: run(command="bash tools/gpu_session.sh run",
#                                  carry=["gpu_wheels"], timeout_s=570)
#
# The GPU machine (../shared/gpu/README.md, the device tool's KINDS.md) has no network and a
# `python3` 3.12 with torch 2.11, triton 3.6, numpy, Pillow, safetensors, tqdm, pytest,
# pytest-benchmark, pytest-xdist, scipy and huggingface_hub 1.33, but no nvtx and no diffusers.
# `prepare` builds the fastdiff wheel and downloads cp312 / pure-Python wheels of what may be
# missing there; `run` installs fastdiff and whichever of the others the machine lacks into a
# private target directory (nothing of the machine's own packages is replaced), then runs, each
# step with its own time limit and log:
#   env.log            GPU, driver, versions, where fastdiff is imported from (stops the run
#                      at once when fastdiff or torch.cuda is not usable)
#   suite.log          the whole test suite on CUDA, one line per test and long tracebacks,
#                      from outside the checkout (so the installed wheel is what runs),
#                      SUITE_WORKERS workers with SUITE_THREADS torch threads each; at its time
#                      limit pytest gets SIGINT, so what ran is still summarised; suite.xml
#   gpu_check.log      benchmarks/gpu_check.py --full --skip-tests (the suite ran the CUDA
#   gpu_check/         tests): graph == eager, benchmarks against the diffusers anchors, a log
#                      and a rows file per part; its tables end gpu_check.log
# The device tool brings back at most 8 files from $OUT, so every log goes into one archive,
# $OUT/results.tgz, rewritten after each step (a run cut at its limit keeps what ended), beside
# $OUT/summary.txt; stdout ends with the summary (the suite's failures, gpu_check's tables).
# Times (seconds) fit a 570 s call: SUITE_S=190, CHECK_S=290.  SUITE_K selects tests with
# pytest -k (a rerun: SUITE_K="name or name" CHECK_S=0, which skips gpu_check).
# DRY_RUN=1 checks the plumbing on a machine without a GPU (gpu_check --smoke), e.g.
#   DRY_RUN=1 SUITE_K=test_dispatch_rules SUITE_WORKERS=0 OUT=/tmp/o bash tools/gpu_session.sh run
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=$REPO/gpu_wheels
PY=${PYTHON:-python3}  # the GPU machine's torch lives in its python3 (there may be no `python`)
# diffusers 0.42.1 is what the suite runs with here; it needs huggingface_hub >= 1.32, which
# the GPU machine has (1.33).  Each lands only where the machine has none of its own.
EXTRA_WHEELS=(nvtx "diffusers==0.42.1" importlib_metadata zipp)

prepare() {
    rm -rf "$WHEELS" && mkdir -p "$WHEELS" || return 1
    "$PY" -m pip wheel --quiet --no-deps -w "$WHEELS" "$REPO" || return 1
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any \
        -d "$WHEELS" "${EXTRA_WHEELS[@]}" || return 1
    du -sh "$WHEELS" && ls "$WHEELS"
}

# The distribution name of a wheel file (PEP 427: name-version-...whl, name with underscores).
wheel_dist() { local f=${1##*/}; echo "${f%%-*}"; }

installed() {  # is distribution $1 importable by the machine's own Python already?
    "$PY" - "$1" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
m.version(sys.argv[1])
EOF
}

# The archive and the summary in $OUT, from the logs in $LOGS (called after every step).
pack() {
    tar czf "$OUT_DIR/results.tgz.part" -C "$LOGS" . && mv "$OUT_DIR/results.tgz.part" "$OUT_DIR/results.tgz"
    summary > "$OUT_DIR/summary.txt"
}

summary() {
    echo "== env"; cat "$LOGS/env.log" 2>/dev/null | tail -n 8
    if [ -f "$LOGS/suite.log" ]; then
        echo "== suite: failures (all of them: suite.log in results.tgz)"
        grep -E "^(FAILED|ERROR) " "$LOGS/suite.log" | cut -c1-220 | head -n 60
        tail -n 2 "$LOGS/suite.log"
    fi
    if [ -f "$LOGS/gpu_check.log" ]; then
        echo "== gpu_check"
        grep -v "^ended part " "$LOGS/gpu_check.log"
    fi
}

run() {
    OUT_DIR=${OUT:-$REPO/gpu_out}
    mkdir -p "$OUT_DIR"
    LOGS=$(mktemp -d)/logs && mkdir -p "$LOGS"
    local site
    site=$(mktemp -d)/site
    {
        for whl in "$WHEELS"/*.whl; do
            dist=$(wheel_dist "$whl")
            if [ "$dist" != fastdiff ] && installed "$dist"; then
                echo "keep the machine's $dist"
                continue
            fi
            echo "install $whl"
            "$PY" -m pip install --quiet --no-index --no-deps --target "$site" "$whl"
        done
    } > "$LOGS/install.log" 2>&1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
    # What the suite must not inherit: the interpreter, a forced backend, strict mode.
    unset TRITON_INTERPRET FASTDIFF_BACKEND FASTDIFF_STRICT
    local tmp
    tmp=$(mktemp -d)  # every step runs outside the checkout's root
    cd "$tmp" || return 1
    { nvidia-smi; "$PY" - <<'EOF'; } > "$LOGS/env.log" 2>&1
import os, sys, torch, triton, fastdiff
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
print("triton", triton.__version__, "fastdiff", fastdiff.__file__)
try:
    import diffusers
    print("diffusers", diffusers.__version__)
except Exception as exc:  # the diffusers tests and benchmarks then skip themselves
    print("diffusers NOT importable:", repr(exc))
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
elif os.environ.get("DRY_RUN") != "1":
    sys.exit("no CUDA device visible")
EOF
    local env_rc=$?
    echo "env exit $env_rc" >> "$LOGS/env.log"
    pack
    if [ "$env_rc" -ne 0 ]; then
        cat "$LOGS/install.log"; summary
        return 1
    fi
    OMP_NUM_THREADS=${SUITE_THREADS:-2} MKL_NUM_THREADS=${SUITE_THREADS:-2} \
        timeout -s INT -k 20 "${SUITE_S:-190}" "$PY" -m pytest "$REPO/tests" \
        -n "${SUITE_WORKERS:-7}" -p no:cacheprovider --tb=long -rfE -v \
        --junitxml="$LOGS/suite.xml" ${SUITE_K:+-k "$SUITE_K"} \
        > "$LOGS/suite.log" 2>&1
    echo "suite exit $?" >> "$LOGS/suite.log"
    pack
    if [ "${CHECK_S:-290}" -gt 0 ]; then
        local mode=(--full)
        [ "${DRY_RUN:-0}" != 1 ] || mode=(--smoke --bench-k "test_q_sample and cpu")
        timeout "$(( ${CHECK_S:-290} + 15 ))" "$PY" "$REPO/benchmarks/gpu_check.py" "${mode[@]}" \
            --skip-tests --budget-s "${CHECK_S:-290}" --out "$LOGS/gpu_check" \
            > "$LOGS/gpu_check.log" 2>&1
        echo "gpu_check exit $?" >> "$LOGS/gpu_check.log"
        pack
    fi
    summary
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash tools/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
