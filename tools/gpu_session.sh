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
# pytest-benchmark, pytest-xdist, scipy, requests, regex, filelock, huggingface_hub 1.33,
# accelerate, transformers and zipp, but no nvtx and no diffusers.
#
# `prepare` builds the fastdiff wheel from what the device tool copies (tracked and untracked,
# not ignored files: no stale build/), checks that the wheel's fastdiff/ sources are the
# checkout's, downloads cp312 / pure-Python wheels of nvtx and diffusers 0.42.1, and writes
# gpu_wheels/SOURCE (git HEAD, a hash of `git diff HEAD`, a hash of the fastdiff/**/*.py and
# kernels/**/*.py files) and SOURCE.files (a hash per file).
#
# `run` exports PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 (nothing waits
# on a network), installs fastdiff and whichever of the others the machine lacks with ONE
# `pip install --no-index --no-deps --no-compile --target` into a private directory (nothing
# of the machine's own packages is replaced; the fastdiff console script lands in its bin/;
# should that call fail, each wheel on its own, fastdiff first, and a WARNING), then runs,
# each step with its own time limit and log:
#   env.log            date, GPU and driver, versions (setuptools too), where fastdiff and
#                      diffusers are imported from, whether the wheel matches this checkout's
#                      fastdiff/ + kernels/ sources (a loud WARNING when not: the run goes on)
#                      and whether diffusers imports (a loud WARNING when not, outside a dry
#                      run); stops the run at once when fastdiff or torch.cuda is not usable;
#                      the full nvidia-smi in nvidia-smi.log, pip's output in install.log
#   suite.log          the whole test suite on CUDA, one line per test and long tracebacks,
#                      from outside the checkout (so the installed wheel is what runs),
#                      SUITE_WORKERS workers with SUITE_THREADS torch threads each; at its time
#                      limit pytest gets SIGINT (20 s later SIGKILL), so what ran is still
#                      summarised ("suite CUT at its time limit" then); suite.xml
#   failures.log       every failure's node id and long traceback, appended the moment it is
#                      reported (tools/pytest_failures_plugin.py), so a cut suite keeps them
#   gpu_check.log      benchmarks/gpu_check.py --full --skip-tests (the suite ran the CUDA
#   gpu_check/         tests): graph == eager, benchmarks against the diffusers anchors, a log
#                      and a rows file per part (one JSON line per finished benchmark)
# The device tool brings back at most 8 files from $OUT and 12,000 characters of stdout: every
# log goes into one archive, $OUT/results.tgz, beside $OUT/summary.txt, both rewritten after
# each step and every PACK_EVERY_S (20) seconds during the suite and gpu_check, so a command
# killed by the tool still brings back every finished benchmark row.  stdout ends with the
# summary (under 11,500 characters, the most important last): env lines, the suite's failures
# (capped), its last lines, gpu_check's part table and a benchmark table built from the rows
# files (so it exists even when gpu_check was cut).
# Times (seconds): the whole run keeps within TOTAL_S=555 from the script's start (a 570 s
# call); the suite gets SUITE_S=190 at most, gpu_check min(CHECK_S=900, what is left - 15),
# which its parts use most wanted first (the ops, training, sampling, the diffusers anchors,
# then --full's digits job, profile, ...).
# SUITE_K selects tests with pytest -k (a rerun: SUITE_K="name or name" CHECK_S=0, which skips
# gpu_check).  A second, short call on the still-warm machine for what did not fit:
#   SUITE_S=0 GPU_CHECK_PARTS=profile,digits-job TOTAL_S=200 bash tools/gpu_session.sh run
# (SUITE_S=0 skips the suite; GPU_CHECK_PARTS runs gpu_check --parts instead of --full;
# set TOTAL_S to the device time left minus ~30 s, from the device tool's status).
# DRY_RUN=1 checks the plumbing on a machine without a GPU (gpu_check --smoke), e.g.
#   DRY_RUN=1 SUITE_K=test_dispatch_rules SUITE_WORKERS=0 OUT=/tmp/o bash tools/gpu_session.sh run
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
WHEELS=$REPO/gpu_wheels
PY=${PYTHON:-python3}  # the GPU machine's torch lives in its python3 (there may be no `python`)
# diffusers 0.42.1 is what the suite runs with here; it needs huggingface_hub >= 1.32, which
# the GPU machine has (1.33).  Each lands only where the machine has none of its own.  (No
# importlib_metadata: neither diffusers nor triton imports it on 3.12, and its current release
# needs lazy-importer, which the machine lacks.)
EXTRA_WHEELS=(nvtx "diffusers==0.42.1")
TOTAL_S=${TOTAL_S:-555}
PACK_EVERY_S=${PACK_EVERY_S:-20}
SUMMARY_CHARS=11500

# srchash tree|site|wheel PATH [MANIFEST]: sha256 over the fastdiff package's .py files, named
# as installed (the checkout's kernels/X.py is fastdiff/kernels/X.py): a checkout (tree), an
# installed package's directory (site) or a wheel file; MANIFEST gets "sha256  path" per file.
srchash() {
    "$PY" - "$@" <<'EOF'
import hashlib, pathlib, sys, zipfile
mode, root = sys.argv[1], pathlib.Path(sys.argv[2])
files = {}
if mode == "wheel":
    with zipfile.ZipFile(root) as z:
        for name in z.namelist():
            if name.startswith("fastdiff/") and name.endswith(".py"):
                files[name] = z.read(name)
else:
    dirs = [("fastdiff", "fastdiff")]
    if mode == "tree":
        dirs.append(("kernels", "fastdiff/kernels"))
    for src, dest in dirs:
        for p in (root / src).rglob("*.py"):
            files[f"{dest}/{p.relative_to(root / src).as_posix()}"] = p.read_bytes()
manifest = "".join(f"{hashlib.sha256(files[k]).hexdigest()}  {k}\n" for k in sorted(files))
if len(sys.argv) > 3:
    pathlib.Path(sys.argv[3]).write_text(manifest)
print(hashlib.sha256(manifest.encode()).hexdigest() if files else "none")
EOF
}

git_diff_hash() {  # sha256 of `git diff HEAD` (tracked changes) of $1, or "none"
    git -C "$1" rev-parse --verify -q HEAD >/dev/null 2>&1 || { echo none; return; }
    git -C "$1" diff --no-ext-diff --no-color HEAD | sha256sum | cut -d' ' -f1
}

prepare() {
    rm -rf "$WHEELS" && mkdir -p "$WHEELS" || return 1
    local tmpd src=$REPO whl want got
    tmpd=$(mktemp -d) || return 1
    if git -C "$REPO" rev-parse --verify -q HEAD >/dev/null 2>&1; then
        # What the device tool copies: tracked files (less deleted ones) and untracked files
        # git does not ignore; no build/ or egg-info whose stale files could enter the wheel.
        src=$tmpd/src && mkdir -p "$src" || return 1
        (cd "$REPO" && git ls-files -z -co --exclude-standard \
            | while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
            | tar --null -T - -cf -) | tar -xf - -C "$src" || return 1
    fi
    "$PY" -m pip wheel --quiet --no-deps -w "$WHEELS" "$src" || return 1
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any \
        -d "$WHEELS" "${EXTRA_WHEELS[@]}" || return 1
    whl=$(find "$WHEELS" -maxdepth 1 -name 'fastdiff-*.whl' | head -n 1)
    [ -n "$whl" ] || { echo "prepare: no fastdiff wheel built" >&2; return 1; }
    want=$(srchash tree "$src" "$WHEELS/SOURCE.files") || return 1
    got=$(srchash wheel "$whl" "$tmpd/wheel.files") || return 1
    if [ "$want" != "$got" ]; then
        echo "prepare: the wheel's fastdiff .py files are not the checkout's:" >&2
        differing "$WHEELS/SOURCE.files" "$tmpd/wheel.files" >&2
        return 1
    fi
    {
        echo "git_head $(git -C "$REPO" rev-parse --verify -q HEAD 2>/dev/null || echo none)"
        echo "git_diff_sha256 $(git_diff_hash "$REPO")"
        echo "src_sha256 $want"
        echo "wheel ${whl##*/}"
        echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } > "$WHEELS/SOURCE"
    rm -rf "$tmpd"
    cat "$WHEELS/SOURCE"
    du -sh "$WHEELS" && ls "$WHEELS"
}

# The distribution name of a wheel file (PEP 427: name-version-...whl, name with underscores).
wheel_dist() { local f=${1##*/}; echo "${f%%-*}"; }

installed() {  # the version of distribution $1 in the machine's own Python, or fail
    "$PY" - "$1" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
print(m.version(sys.argv[1]))
EOF
}

# Install fastdiff and the wheels the machine lacks into $1 with one pip call (one call: a
# second `--target` install would skip the existing bin/ and lose fastdiff's console script).
install_wheels() {
    local site=$1 whl dist version
    local todo=()
    for whl in "$WHEELS"/*.whl; do
        [ -e "$whl" ] || { echo "no wheels in $WHEELS: run prepare first"; return 1; }
        dist=$(wheel_dist "$whl")
        if [ "$dist" != fastdiff ] && version=$(installed "$dist"); then
            echo "keep the machine's $dist $version"
            continue
        fi
        echo "install ${whl##*/}"
        todo+=("$whl")
    done
    local pip=(timeout -k 5 120 "$PY" -m pip install --quiet --no-index --no-deps --no-compile)
    "${pip[@]}" --target "$site" "${todo[@]}" && return 0
    # One bad wheel fails the whole call: then each on its own, fastdiff first (its bin/).
    echo "the one pip call failed: each wheel on its own, fastdiff first"
    for whl in "${todo[@]}"; do [ "$(wheel_dist "$whl")" != fastdiff ] || "${pip[@]}" --target "$site" "$whl"; done
    for whl in "${todo[@]}"; do [ "$(wheel_dist "$whl")" = fastdiff ] || "${pip[@]}" --target "$site" "$whl"; done
    return 1
}

differing() {  # the paths whose lines differ between two srchash manifests (8 at most)
    comm -3 <(sort "$1" 2>/dev/null) <(sort "$2" 2>/dev/null) | sed 's/^[[:space:]]*[0-9a-f]*  //' \
        | sort -u | head -n 8 | paste -sd ' '
}

# Lines for env.log: does the installed wheel hold this checkout's fastdiff sources?
check_source() {
    local site=$1 want have inst head diff_hash
    have=$(srchash tree "$REPO" "$LOGS/checkout.files")
    inst=$(srchash site "$site" "$LOGS/installed.files")
    if [ ! -f "$WHEELS/SOURCE" ]; then
        echo "WARNING: gpu_wheels/SOURCE missing: cannot tell whether the wheel is this checkout's"
    else
        cp "$WHEELS/SOURCE" "$LOGS/SOURCE"
        want=$(sed -n 's/^src_sha256 //p' "$WHEELS/SOURCE")
        if [ "$want" = "$have" ]; then
            echo "source: the wheel was prepared from these fastdiff/ + kernels/ sources" \
                "(src ${have:0:12}; $(grep -E '^(git_head|prepared) ' "$WHEELS/SOURCE" | paste -sd ' '))"
        else
            echo "WARNING: WHEEL/CHECKOUT MISMATCH: gpu_wheels was prepared from other" \
                "fastdiff/ or kernels/ sources than this checkout's (src ${want:0:12} !=" \
                "${have:0:12}): the run tests the wheel; rerun prepare. Differing files:" \
                "$(differing "$WHEELS/SOURCE.files" "$LOGS/checkout.files")"
        fi
        head=$(git -C "$REPO" rev-parse --verify -q HEAD 2>/dev/null)
        if [ -n "$head" ]; then
            diff_hash=$(git_diff_hash "$REPO")
            grep -qx "git_head $head" "$WHEELS/SOURCE" \
                && grep -qx "git_diff_sha256 $diff_hash" "$WHEELS/SOURCE" \
                || echo "note: git HEAD ${head:0:12} or its diff differs from prepare's"
        fi
    fi
    if [ "$inst" != "$have" ]; then
        echo "WARNING: the INSTALLED fastdiff ($site) is not this checkout's sources" \
            "(${inst:0:12} != ${have:0:12}): $(differing "$LOGS/installed.files" \
            "$LOGS/checkout.files")"
    fi
}

# The archive and the summary in $OUT, from the logs in $LOGS (each written aside, then moved).
# No weights (gpu_check's digits-job writes checkpoints); and over 15 MiB (the device tool
# brings back 16 MiB a file at most) only the text files.
pack() {
    local part=$OUT_DIR/results.tgz.part rc
    tar czf "$part" --warning=no-file-changed --exclude='*.safetensors' --exclude='*.pt' \
        --exclude='*.pth' --exclude='*.bin' --exclude='*.ckpt' -C "$LOGS" . 2>/dev/null
    rc=$?
    if [ "$rc" -le 1 ] && [ "$(stat -c %s "$part" 2>/dev/null || echo 0)" -gt 15728640 ]; then
        (cd "$LOGS" && find . -type f -size -8M \( -name '*.log' -o -name '*.jsonl' \
            -o -name '*.json' -o -name '*.xml' -o -name '*.txt' -o -name '*.files' \
            -o -name SOURCE \) -print0 | tar czf "$part" --warning=no-file-changed --null -T -) \
            2>/dev/null
        rc=$?
    fi
    [ "$rc" -gt 1 ] || mv -f "$part" "$OUT_DIR/results.tgz"
    summary > "$OUT_DIR/summary.txt.part" && mv -f "$OUT_DIR/summary.txt.part" "$OUT_DIR/summary.txt"
}

# Run "$@" in the foreground while a background loop packs every PACK_EVERY_S seconds; the
# loop is stopped (and waited for) before this returns the command's exit status.
with_packing() {
    local stop=$WORK/stop-packing packer rc
    rm -f "$stop"
    (
        n=0
        while [ ! -e "$stop" ]; do
            sleep 1
            n=$((n + 1))
            [ $((n % PACK_EVERY_S)) -ne 0 ] || [ -e "$stop" ] || pack
        done
    ) >/dev/null 2>&1 &
    packer=$!
    "$@"
    rc=$?
    touch "$stop"
    wait "$packer"
    return "$rc"
}

summary() {
    "$PY" - "$LOGS" "$SUMMARY_CHARS" "$REPO/benchmarks" <<'EOF' || { echo "(summary failed: the logs' tails)"; tail -c 3000 "$LOGS"/*.log; }
import json, pathlib, re, sys

logs, limit = pathlib.Path(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
from gpu_check import part_names, read_rows  # noqa: E402  (the rows' format lives there)

def read(name):
    p = logs / name
    return p.read_text(errors="replace").splitlines() if p.exists() else None

def cut(line, n=220):
    return line if len(line) <= n else line[: n - 3] + "..."

def capped(lines, chars, most=None, where="results.tgz"):
    """The first lines (at most `most`) that fit in chars, and a note of how many more."""
    out, used = [], 0
    for i, line in enumerate(lines):
        if used + len(line) + 1 > chars or (most is not None and i >= most):
            out.append(f"... {len(lines) - i} more lines in {where}")
            break
        out.append(line)
        used += len(line) + 1
    return out

# env
env = read("env.log") or ["(no env.log)"]
warnings = [ln for ln in env if ln.startswith("WARNING")]
env = [("!!! " + ln if ln.startswith("WARNING") else ln) for ln in env]
if len(env) > 40:
    env = env[:15] + [f"... {len(env) - 35} lines ..."] + env[-20:]
env_part = ["== env (all of it: env.log, install.log, nvidia-smi.log in results.tgz)"]
env_part += capped([cut(ln, 400) for ln in env], 2500)

# suite
suite_head, suite_fail, suite_tail = [], [], []
suite = read("suite.log")
if suite is not None:
    failures = [ln[5:] for ln in read("failures.log") or [] if ln.startswith("#### ")]
    pattern = re.compile(r"^=+ .*\b(passed|failed|errors?|skipped|deselected|no tests ran)\b.* in ")
    cut_mark = re.compile(r"^!+ .*(Interrupted|KeyboardInterrupt)")
    last = [ln for ln in suite if pattern.match(ln) or cut_mark.match(ln)]
    suite_tail = [cut(ln, 300) for ln in last[-2:]]
    suite_tail += [cut(ln, 300) for ln in suite if ln.startswith(("suite exit", "suite CUT", "suite NOT"))]
    suite_head = [f"== suite: {len(failures)} failed/errors (tracebacks: failures.log, suite.log in results.tgz)"]
    suite_fail = [cut(ln, 200) for ln in failures]

# gpu_check: its part table and other lines, and a benchmark table from the rows files
gpu_part = []
check = read("gpu_check.log")
if check is not None:
    gpu_part = ["== gpu_check (gpu_check.log, gpu_check/ in results.tgz)"]
    has_table = any(ln.startswith("part ") and "| status" in ln for ln in check)
    other, in_bench = [], False
    for ln in check:
        if ln.startswith("benchmark ") and "| median" in ln:
            in_bench = True
        elif in_bench and not ln.strip():
            in_bench = False
        elif in_bench or ln.startswith("logs: ") or (has_table and ln.startswith("ended part ")):
            continue
        elif ln.strip():
            other.append(cut(ln.rstrip(), 400))
    if len(other) > 60:
        other = other[:10] + [f"... {len(other) - 50} lines ..."] + other[-40:]
    gpu_part += other
    order = part_names(full=True) + ["bench"]
    files = sorted((logs / "gpu_check").glob("*.rows.jsonl"),
                   key=lambda p: (order.index(p.name[:-11]) if p.name[:-11] in order else 99, p.name))
    figures = [("device_us", "dev us"), ("gb_per_s", "GB/s"), ("pct_of_copy", "%copy"),
               ("pct_of_1gib_copy", "%1GiB"), ("speedup_vs_eager", "x eager"),
               ("images_per_s", "img/s"), ("ms_per_step", "ms/step"), ("host_us", "host us")]
    groups = {}
    for f in files:
        for r in read_rows(f):
            base, _, params = r["name"].partition("[")
            base = base.removeprefix("test_")
            params = params.rstrip("]").removeprefix("cuda-")
            if r["failed"]:  # timed, then failed
                params += " FAILED"
            info = r["info"]
            median = r["median"]
            groups.setdefault((f.name[:-11], base), []).append((params, median, info))

    def num(v):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"

    bench = []
    for (part, base), rows in groups.items():
        cols = [(k, lab) for k, lab in figures
                if any(isinstance(i.get(k), (int, float)) for _, _, i in rows)]
        table = [[f"{part}: {base}", "median ms", *[lab for _, lab in cols]]]
        for params, median, info in rows:
            table.append(["  " + (params or "-"), "-" if median is None else num(median * 1e3),
                          *[num(info[k]) if isinstance(info.get(k), (int, float)) else ""
                            for k, _ in cols]])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        bench += [" ".join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in table]
    if bench:
        gpu_part.append(f"benchmarks: {sum(len(r) for r in groups.values())} rows (gpu_check/*.rows.jsonl)")
        gpu_part += bench

tail = ["!!! " + cut(w, 300) for w in warnings]
fixed = sum(len(ln) + 1 for ln in env_part + suite_head + suite_tail + tail)
# The gpu_check section first (it is printed last, the most wanted); then the failures.
gpu_room = max(2000, limit - fixed - min(1200, sum(len(ln) + 1 for ln in suite_fail[:30])))
gpu_part = capped(gpu_part, gpu_room)
fail_room = limit - fixed - sum(len(ln) + 1 for ln in gpu_part)
shown = capped(suite_fail, fail_room, most=30, where="failures.log")
text = "\n".join(env_part + suite_head + shown + suite_tail + gpu_part + tail)
if len(text) > limit:  # the last resort: keep the end
    text = "(cut)\n" + text[-limit:]
print(text)
EOF
}

# min of its integer arguments
min() { local m=$1 x; for x in "$@"; do [ "$x" -ge "$m" ] || m=$x; done; echo "$m"; }

run() {
    OUT_DIR=${OUT:-$REPO/gpu_out}
    mkdir -p "$OUT_DIR" || return 1
    WORK=$(mktemp -d) || return 1
    LOGS=$WORK/logs
    mkdir -p "$LOGS" || return 1
    # Nothing may wait on a network there is none of.
    export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        HF_HUB_OFFLINE=1
    local site=$WORK/site plugins=$WORK/plugins plugin_args=()
    # The plugin alone on the suite's PYTHONPATH (not all of tools/); without it the suite
    # still runs, its tracebacks then only at its end.
    mkdir -p "$plugins" && cp "$REPO/tools/pytest_failures_plugin.py" "$plugins/" \
        && plugin_args=(-p pytest_failures_plugin)
    install_wheels "$site" > "$LOGS/install.log" 2>&1
    local install_rc=$?
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 \
            | tr '\n' ';')"
        echo "install: exit $install_rc; $(grep -E '^(install|keep) ' "$LOGS/install.log" \
            | tr '\n' ';')"
        [ "$install_rc" -eq 0 ] || echo "WARNING: pip install failed:" \
            "$(grep -E '^(ERROR|the one pip call)' "$LOGS/install.log" | cut -c1-200 | paste -sd ' ')"
        if [ -x "$site/bin/fastdiff" ]; then
            echo "install: fastdiff console script $site/bin/fastdiff"
        else
            echo "WARNING: no fastdiff console script in $site/bin (tests running \`fastdiff\` fail)"
        fi
        [ "${#plugin_args[@]}" -gt 0 ] || echo "WARNING: no tools/pytest_failures_plugin.py:" \
            "no failures.log (a cut suite may lose its tracebacks)"
        check_source "$site"
    } > "$LOGS/env.log" 2>&1
    nvidia-smi > "$LOGS/nvidia-smi.log" 2>&1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
    # What the suite must not inherit: the interpreter, a forced backend, strict mode.
    unset TRITON_INTERPRET FASTDIFF_BACKEND FASTDIFF_STRICT
    cd "$WORK" || return 1  # every step runs outside the checkout's root
    timeout -k 5 150 "$PY" - >> "$LOGS/env.log" 2>&1 <<'EOF'
import importlib.metadata as md, os, sys
dry = os.environ.get("DRY_RUN") == "1"

def ver(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"

print("python:", sys.version.split()[0], sys.executable)
print("packages:", ", ".join(f"{d} {ver(d)}" for d in (
    "setuptools", "pip", "numpy", "nvtx", "huggingface_hub", "transformers", "pytest",
    "pytest-xdist", "pytest-benchmark")))
import torch, triton
print("torch:", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton:", triton.__version__)
import fastdiff
print("fastdiff:", ver("fastdiff"), "from", os.path.dirname(fastdiff.__file__))
try:
    import diffusers
    from diffusers import DDPMPipeline, UNet2DModel  # noqa: F401
    print("diffusers:", diffusers.__version__, "from", os.path.dirname(diffusers.__file__))
except Exception as exc:  # the diffusers tests and benchmarks then skip themselves
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    print(f"{'note' if dry else 'WARNING'}: diffusers NOT importable ({type(exc).__name__}:"
          f" {first}): tests/test_diffusers.py and the diffusers benchmarks skip themselves")
try:  # the training anchors' imports (transformers, accelerate, peft where installed)
    from diffusers.optimization import get_scheduler  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401
except Exception as exc:
    print(f"{'note' if dry else 'WARNING'}: diffusers.training_utils NOT importable"
          f" ({type(exc).__name__}: {str(exc)[:160]}): the diffusers training anchors skip")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
elif not dry:
    sys.exit("no CUDA device visible")
EOF
    local env_rc=$?
    echo "env exit $env_rc" >> "$LOGS/env.log"
    [ "$env_rc" -eq 0 ] || echo "WARNING: the env step failed (exit $env_rc): the suite and" \
        "gpu_check were not run" >> "$LOGS/env.log"
    pack
    if [ "$env_rc" -ne 0 ]; then
        cat "$LOGS/install.log"; summary
        return 1
    fi

    local suite_s suite_rc
    suite_s=$((TOTAL_S - SECONDS - 25))  # its SIGKILL comes 20 s after its SIGINT
    if [ "${SUITE_S:-190}" -eq 0 ]; then
        echo "suite NOT RUN: SUITE_S=0 (a second call)" > "$LOGS/suite.log"
    elif [ "$suite_s" -lt 10 ]; then
        echo "suite NOT RUN: $((TOTAL_S - SECONDS)) s left of TOTAL_S=$TOTAL_S" > "$LOGS/suite.log"
    else
        suite_s=$(min "${SUITE_S:-190}" "$suite_s")
        with_packing env GPU_SESSION_FAILURES_LOG="$LOGS/failures.log" \
            PYTHONPATH="$plugins:$PYTHONPATH" \
            OMP_NUM_THREADS="${SUITE_THREADS:-2}" MKL_NUM_THREADS="${SUITE_THREADS:-2}" \
            timeout -s INT -k 20 "$suite_s" "$PY" -m pytest "$REPO/tests" \
            "${plugin_args[@]}" -n "${SUITE_WORKERS:-7}" -p no:cacheprovider \
            --tb=long -rfE -v --junitxml="$LOGS/suite.xml" ${SUITE_K:+-k "$SUITE_K"} \
            > "$LOGS/suite.log" 2>&1
        suite_rc=$?
        echo "suite exit $suite_rc" >> "$LOGS/suite.log"
        if [ "$suite_rc" -eq 124 ] || [ "$suite_rc" -eq 137 ] \
            || grep -qE '^(!+ .*Interrupted|KeyboardInterrupt)' "$LOGS/suite.log"; then
            echo "suite CUT at its time limit ($suite_s s): the tests that did not run are" \
                "not in its counts; failures so far: failures.log" >> "$LOGS/suite.log"
        fi
    fi
    pack

    local check_s=${CHECK_S:-900} budget check_rc
    if [ "$check_s" -gt 0 ]; then
        budget=$(min "$check_s" $((TOTAL_S - SECONDS - 15)))
        if [ "$budget" -lt 45 ]; then
            echo "gpu_check NOT RUN: $((TOTAL_S - SECONDS)) s left of TOTAL_S=$TOTAL_S" \
                > "$LOGS/gpu_check.log"
        else
            local mode=(--full)
            [ -z "${GPU_CHECK_PARTS:-}" ] || mode=(--parts "$GPU_CHECK_PARTS")
            [ "${DRY_RUN:-0}" != 1 ] || mode=(--smoke --bench-k "test_q_sample and cpu")
            [ "${DRY_RUN:-0}" != 1 ] || [ -z "${GPU_CHECK_PARTS:-}" ] \
                || mode=(--smoke --parts "$GPU_CHECK_PARTS")
            with_packing timeout -k 5 $((budget + 10)) "$PY" "$REPO/benchmarks/gpu_check.py" \
                "${mode[@]}" --skip-tests --budget-s "$budget" --out "$LOGS/gpu_check" \
                > "$LOGS/gpu_check.log" 2>&1
            check_rc=$?
            echo "gpu_check exit $check_rc (budget $budget s; the run at $SECONDS s of" \
                "TOTAL_S=$TOTAL_S)" >> "$LOGS/gpu_check.log"
        fi
        pack
    fi
    summary
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash tools/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
