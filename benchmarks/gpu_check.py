"""One GPU check: tests on CUDA, CUDA-graph sampling == eager, device times, one table.

    python benchmarks/gpu_check.py [--out DIR] [--budget-s S] [--full | --parts A,B]

Run it on one NVIDIA GPU with fastdiff installed (wheel or editable) and its test extra; it
takes under 6 minutes (``--full``: about 15) and prints one table.  Each part runs in its own
subprocess with its own time limit and log file in ``--out`` (default ``gpu_check_out/``), so
a hang or a crash in one part still leaves the others' results:

1. ``env``: GPU, driver, torch / triton / fastdiff versions and where fastdiff is imported from.
2. ``tests``: the kernel and CUDA tests (compiled Triton kernels on CUDA tensors instead of the
   interpreter; every test that skips itself without CUDA: ``CUDA_TESTS``, which
   tests/test_gpu_check.py checks against the suite), serially, with the working directory
   outside the checkout so the installed fastdiff is what runs.
3. ``graph``: a digits-preset U-Net sampled with the CUDA graph and eagerly for one seed; the
   images must be equal (max |difference| printed).
4. the CUDA benchmarks, most wanted first, each part its own pytest run with its own JSON
   report and time share (a part cut by its limit keeps the earlier parts' rows):
   ``bench-ops`` (device time, GB/s, % of copy and of a 1 GiB copy, x eager: the noising,
   loss and reverse-step ops and GroupNorm+SiLU), ``bench-train`` (the training step, bf16
   channels_last: graph / eager / eager torch, cifar10 and digits presets; the cifar10 graph
   also in fp32 and fp16), ``bench-diffusers`` (the anchors: diffusers' example and tuned
   training loops at equal parameters, its sampling loop with fp32 weights, under autocast
   and with bf16 weights, beside fastdiff sampling the same pipeline), ``bench-sample``
   (s/step against batch size, and guided against unguided).  With ``--full`` also the
   jobs ``digits-job`` (``fastdiff train --device cuda``, the default job, timed from its
   metrics.jsonl) and ``profile`` (benchmarks/gpu_profile.py: kernels, device and host time
   per step), then ``bench-train-more`` (the other fp32, fp16 and contiguous cases),
   ``bench-ops-samplers`` (the DDIM / DPM-Solver++ step ops) and ``bench-compile``
   (compile=True).  ``--parts A,B`` runs the named parts in that order instead, without the
   graph check (e.g. a second, short GPU call: ``--parts profile,digits-job``).  Benchmarks
   are summarised as one row each (median time and the extra_info figures: GB/s, % of copy,
   images/s, ms/step; "FAILED" after the name when the test failed after timing).
   ``--bench-k EXPR`` instead runs one part, ``bench``: all of benchmarks/ with ``-k EXPR``.
   Each benchmark's row is appended to ``<part>.rows.jsonl`` as soon as it has run
   (benchmarks/conftest.py, ``FASTDIFF_BENCH_ROWS``), so a part killed at its time limit keeps
   the rows it finished; pytest-benchmark's own ``<part>.json`` is written only at its end.

Each part's line is printed when it ends and the tables again at the end; a part that would
start with less than ``MIN_PART_S`` left is not started ("SKIPPED (no time)").
``--skip-tests`` leaves out part 2 (tools/gpu_session.sh runs the whole suite on CUDA first).

``--smoke`` runs the same parts on the CPU, small (how the test suite checks this script).
Exit status: 0 when every part passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The tests that exercise CUDA when a GPU is present: whole files (kernels on CUDA tensors
#: through helpers.DEVICE, graphs, hot loops) and single tests (file::name) that skip
#: themselves without CUDA; the rest of the suite is CPU-only logic that CI covers.
#: tests/test_gpu_check.py checks that this selects every test marked to skip without CUDA
#: and every file that runs its tests on helpers.DEVICE.
CUDA_TESTS = [
    "tests/test_ops_vs_reference.py",
    "tests/test_kernel_noise.py",
    "tests/test_group_norm.py",
    "tests/test_schedule.py",
    "tests/test_ddpm_clip.py",
    "tests/test_sampling.py",
    "tests/test_dpm_solver.py",
    "tests/test_ddim_kernel.py",
    "tests/test_guidance_ops.py",
    "tests/test_nan_propagation.py",
    "tests/test_metrics.py",
    "tests/test_train_graph.py",
    "tests/test_training.py::test_cuda_hot_loop_does_not_synchronise",
    "tests/test_low_precision.py::test_cuda_bf16_sampling_uses_the_copy_and_keeps_the_model",
    "tests/test_graph_capture.py::test_a_model_with_item_trains_on_cuda_with_the_default_graph",
    "tests/test_graph_capture.py::test_a_cpu_checkpoint_resumes_in_the_cuda_graph_step",
    "tests/test_graph_capture.py::test_ops_on_the_second_gpu_equal_the_first",
]
#: ``--smoke`` (CPU) keeps to these of them: the CUDA-only tests there are skipped.
SMOKE_K = "cuda_graph or hot_loop"
#: (part, benchmark file, pytest -k, seconds at most), most wanted first: the fused ops, the
#: training step, the diffusers anchors (its training loops at equal parameters and its
#: sampling loops, with fastdiff's sampling of the same pipeline) and fastdiff's sampling
#: against batch size (unguided and guided), so that one call of tools/gpu_session.sh (the
#: suite, then these) measures every ratio of the issue in one run.
#: The training part: every side in bf16 channels_last, and the captured cifar10 step in fp32
#: and fp16 too (the issue's "precisions differ": a host-bound step would not).
_TRAIN_CORE = (
    "test_train_step and cuda and channels_last and not compile"
    " and (bf16 or (fastdiff_graph and cifar10))"
)
BENCH_PARTS = [
    ("bench-ops", "test_bench_ops.py", "cuda and not sampler_step", 80),
    ("bench-train", "test_bench_train_sample.py", _TRAIN_CORE, 100),
    ("bench-diffusers", "test_bench_diffusers.py", "cuda", 100),
    ("bench-sample", "test_bench_train_sample.py",
     "(test_sample or test_guided_sample) and cuda", 70),
]  # fmt: skip
#: What ``--full`` adds after them (and the JOB_PARTS, which run first of these).
FULL_PARTS = [
    ("bench-train-more", "test_bench_train_sample.py",
     f"test_train_step and cuda and not compile and not ({_TRAIN_CORE})", 150),
    ("bench-ops-samplers", "test_bench_ops.py", "cuda and sampler_step", 60),
    ("bench-compile", "test_bench_train_sample.py", "test_train_step and cuda and compile", 150),
]  # fmt: skip
#: Parts that are not benchmarks (``--full``, or by name with ``--parts``): the default job as
#: users run it, and the profile of the steps (benchmarks/gpu_profile.py).  Seconds at most.
JOB_PARTS = {"digits-job": 120, "profile": 90}
#: The default job's steps (``fastdiff train``): digits_job_figures says whether it got there.
JOB_STEPS = 5000
#: A part is not started with less time than this left: importing torch, starting CUDA and
#: collecting tests alone take ~10-20 s, so a shorter part could only fail.
MIN_PART_S = 30.0
#: Where benchmarks/conftest.py appends one JSON line per finished benchmark.
ROWS_ENV = "FASTDIFF_BENCH_ROWS"
#: extra_info keys worth a column, in order (benchmarks may record any subset).
FIGURES = [
    ("device_us", "device us"),
    ("gb_per_s", "GB/s"),
    ("pct_of_copy", "% copy"),
    ("pct_of_1gib_copy", "% 1GiB"),
    ("speedup_vs_eager", "x eager"),
    ("images_per_s", "img/s"),
    ("ms_per_step", "ms/step"),
    ("host_us", "host us"),
]

ENV_PROBE = """
import datetime, json, subprocess, sys, torch, fastdiff
info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "fastdiff": fastdiff.__version__, "fastdiff_from": fastdiff.__file__,
        "cuda": torch.cuda.is_available()}
try:
    info["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
except Exception:  # no nvidia-smi (a CPU smoke run)
    info["driver"] = None
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = p.name
    info["sm"] = f"{p.major}{p.minor}"
    info["memory_gib"] = round(p.total_memory / 2**30, 1)
print(json.dumps(info))
"""

GRAPH_CHECK = """
import json, sys, torch
from fastdiff import Diffusion, NoiseSchedule
from fastdiff.training import model_for_data
device, preset = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = model_for_data((1, 16, 16), preset).to(device).eval()
d = Diffusion(model, NoiseSchedule.linear(50), (1, 16, 16))
eager = d.sample(16, seed=7, cuda_graph=False)
graph = d.sample(16, seed=7, cuda_graph=True, strict=True)  # an eager fallback would be equal
diff = float((graph - eager).abs().max())
print(json.dumps({"max_abs_diff": diff, "equal": diff == 0.0, "on_cuda": graph.is_cuda}))
sys.exit(0 if diff == 0.0 else 1)
"""


def tests_part_args(smoke: bool = False) -> list[str]:
    """The pytest arguments of the ``tests`` part: CUDA_TESTS as absolute paths (entries whose
    file is missing are left out), and with ``smoke`` the ``-k`` that keeps it short."""
    args = []
    for entry in CUDA_TESTS:
        path, _, name = entry.partition("::")
        if (ROOT / path).exists():
            args.append(str(ROOT / path) + (f"::{name}" if name else ""))
    return args + (["-k", SMOKE_K] if smoke else [])


def run_part(
    name: str, cmd: list[str], out: Path, timeout: float, cwd: Path, extra_env=None
) -> dict:
    """Run one part; its stdout+stderr go to out/<name>.log.  Returns status and timing;
    prints the part's line at once (a run cut short still shows the parts that ended).
    With less than MIN_PART_S of ``timeout`` the part is not started."""
    log = out / f"{name}.log"
    if timeout < MIN_PART_S:
        log.write_text(f"not started: {timeout:.0f} s left\n")
        return _report({"part": name, "status": "SKIPPED (no time)", "seconds": 0.0, "log": log})
    start = time.perf_counter()
    # A clean child: no interpreter, and nothing of a parent pytest(-xdist) run.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRITON_INTERP"))}
    env.pop("FASTDIFF_BACKEND", None)  # default dispatch: the Triton kernels on CUDA tensors
    env["FASTDIFF_STRICT"] = "1"  # no part may time (or pass on) an eager fallback
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra_env or {})
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
            status = "pass" if proc.returncode == 0 else f"FAIL (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"FAIL (over {timeout:.0f} s)"
    return _report(
        {"part": name, "status": status, "seconds": time.perf_counter() - start, "log": log}
    )


def _report(result: dict) -> dict:
    part, status, seconds = result["part"], result["status"], result["seconds"]
    print(f"ended part {part}: {status} ({seconds:.0f} s)", flush=True)
    return result


def last_json_line(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def pytest_summary(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    words = (" passed", " failed", " error", " skipped", " deselected")
    tail = [ln for ln in lines if any(w in ln for w in words)]
    return tail[-1].strip("= ") if tail else "(no pytest summary)"


def read_rows(rows_file: Path) -> list[dict]:
    """The benchmark lines of ``rows_file`` (JSON lines of benchmarks/conftest.py: name, median
    seconds or null, extra_info, the test's outcome), each as {"name", "median", "info",
    "failed"}; seconds per step also as ms_per_step; a line cut by a kill is skipped.
    (tools/gpu_session.sh's summary reads the rows through this too.)"""
    rows = []
    for line in rows_file.read_text(errors="replace").splitlines():
        try:
            b = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        info = dict(b.get("extra_info") or {})
        if "s_per_step" in info and "ms_per_step" not in info:
            info["ms_per_step"] = info["s_per_step"] * 1e3
        failed = b.get("outcome", "passed") in ("failed", "error")
        rows.append({"name": b["name"], "median": b.get("median"), "info": info, "failed": failed})
    return rows


def bench_rows(rows_file: Path) -> list[list[str]]:
    """One table row per benchmark of ``rows_file`` (read_rows): name (with "FAILED" when the
    test failed after timing, e.g. a fallback found), median, and the FIGURES present."""
    rows = []
    for r in read_rows(rows_file):
        median = r["median"]
        row = [r["name"] + (" FAILED" if r["failed"] else ""),
               "-" if median is None else f"{median * 1e3:.3f} ms"]  # fmt: skip
        for key, _ in FIGURES:
            value = r["info"].get(key)
            row.append(f"{value:,.1f}" if isinstance(value, (int, float)) else "")
        rows.append(row)
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), "-+-".join("-" * w for w in widths)] + [
        fmt.format(*r) for r in rows
    ])  # fmt: skip


def part_names(full: bool) -> list[str]:
    """The parts run by default (``full``: all of them), in order."""
    names = [name for name, *_ in BENCH_PARTS]
    if full:
        names += list(JOB_PARTS) + [name for name, *_ in FULL_PARTS]
    return names


def _parts_arg(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in part_names(True)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {unknown}; known: {', '.join(part_names(True))}"
        )
    return names


def job_command(name: str, py: str, out: Path, smoke: bool) -> list[str]:
    """The command of a JOB_PARTS entry.  ``digits-job``: the default job (``fastdiff train``,
    5000 steps of the digits preset, checkpoints and the final grid) on the GPU, written to
    ``out/digits-job``; ``profile``: benchmarks/gpu_profile.py.  Smoke: 20 CPU steps, tiny
    profile cases."""
    if name == "digits-job":
        run_dir = out / "digits-job"
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's metrics are no result
        cmd = [py, "-m", "fastdiff", "train", "--out", str(run_dir), "--no-progress"]
        cmd += ["--device", "cpu", "--steps", "20", "--log-every", "5"] if smoke else [
            "--device", "cuda"]  # fmt: skip
        return cmd
    return [py, str(ROOT / "benchmarks" / "gpu_profile.py")] + (["--smoke"] if smoke else [])


def digits_job_figures(run_dir: Path) -> dict:
    """Training time of the default job from its metrics.jsonl (one line per log window with
    ``step``, ``images_per_s`` and the unix ``time`` at its end): ``train_s`` from the first
    window's end to the last's plus the first window's own length (steps x batch / images_per_s
    with batch = 64, the default job's), ``steps``, the last window's images/s and whether
    it reached JOB_STEPS.  A run cut by its time limit still gives what it reached, and the
    time the whole job would take at its pace (``projected_train_s``)."""
    path = run_dir / "metrics.jsonl"
    windows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "time" in rec and "images_per_s" in rec:
                windows.append(rec)
    if not windows:
        return {"steps": 0}
    first, last = windows[0], windows[-1]
    first_s = first["step"] * 64 / first["images_per_s"]
    train_s = last["time"] - first["time"] + first_s
    figures = {
        "steps": last["step"],
        "train_s": round(train_s, 2),
        "last_images_per_s": round(last["images_per_s"], 1),
        "complete": last["step"] >= JOB_STEPS,
    }
    if not figures["complete"]:  # cut by its time limit: what the whole job would take
        figures["projected_train_s"] = round(train_s * JOB_STEPS / last["step"], 1)
    return figures


PROFILE_HEADER = ["profile case", "host ms/step", "wall ms/step", "kernels/step",
                  "device ms/step", "top kernel (ms/step)"]  # fmt: skip


def profile_rows(log: Path) -> list[list[str]]:
    """One row per JSON line of benchmarks/gpu_profile.py in ``log``."""
    rows = []
    if not log.exists():
        return rows
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "error" in r:
            rows.append([r.get("case", "?"), "ERROR", r["error"][:60], "", "", ""])
            continue
        top = r["top"][0] if r["top"] else None
        odd = " (device > wall?)" if r["device_ms_per_step"] > 1.05 * r["wall_ms_per_step"] else ""
        rows.append([
            r["case"], f"{r['host_ms_per_step']:.3f}", f"{r['wall_ms_per_step']:.3f}",
            f"{r['kernels_per_step']:g}", f"{r['device_ms_per_step']:.3f}{odd}",
            f"{top['kernel'][:40]} ({top['ms_per_step']:.3f})" if top else "",
        ])  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="log directory [gpu_check_out]")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="total time limit [335; --full: 900]"
    )
    parser.add_argument(
        "--bench-k", default=None, help="one benchmark part: all of benchmarks/ with pytest -k"
    )
    parser.add_argument(
        "--full", action="store_true", help="also diffusers and the other training variants"
    )
    parser.add_argument(
        "--parts",
        type=_parts_arg,
        default=None,
        help="comma-separated parts to run, in this order (after env; no graph check) "
        f"[default: {','.join(part_names(False))}; --full: all]",
    )
    parser.add_argument("--smoke", action="store_true", help="run the parts on the CPU, small")
    parser.add_argument(
        "--skip-tests", action="store_true", help="leave out the CUDA tests (run elsewhere)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (900 if args.full else 335)
    deadline = time.perf_counter() + budget
    py = sys.executable
    device = "cpu" if args.smoke else "cuda"
    bench_k = args.bench_k or ("cpu" if args.smoke and not args.parts else None)
    results = []

    with tempfile.TemporaryDirectory() as cwd_name:  # outside the checkout's root
        cwd = Path(cwd_name)

        def left(share: float) -> float:
            return max(0.0, min(share, deadline - time.perf_counter()))

        results.append(run_part("env", [py, "-c", ENV_PROBE], out, left(60), cwd))
        env = last_json_line(out / "env.log")
        if not args.smoke and not env.get("cuda"):
            print(f"gpu_check: no CUDA device visible (see {out / 'env.log'})", file=sys.stderr)
            return 1
        test_cmd = [
            py,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *tests_part_args(args.smoke),
        ]
        if not args.skip_tests:
            results.append(run_part("tests", test_cmd, out, left(150), cwd))
        if not args.parts:  # --parts (e.g. a short second GPU call) runs the named parts only
            graph_cmd = [py, "-c", GRAPH_CHECK, device, "tiny" if args.smoke else "digits"]
            results.append(run_part("graph", graph_cmd, out, left(60), cwd))
        bench_parts = {name: (path, k, share) for name, path, k, share in BENCH_PARTS + FULL_PARTS}
        if bench_k is not None:
            names = ["bench"]
            bench_parts["bench"] = ("", bench_k, 240)
        else:
            names = args.parts or part_names(args.full)
        rows_files, jobs = [], []
        for name in names:
            if name in JOB_PARTS:
                cmd = job_command(name, py, out, args.smoke)
                results.append(run_part(name, cmd, out, left(JOB_PARTS[name]), cwd))
                jobs.append(name)
                continue
            path, k, share = bench_parts[name]
            report, rows_file = out / f"{name}.json", out / f"{name}.rows.jsonl"
            for stale in (report, rows_file):  # an earlier run's results are no result
                stale.unlink(missing_ok=True)
            bench_cmd = [
                py, "-m", "pytest", str(ROOT / "benchmarks" / path), "--benchmark-only", "-q",
                "-p", "no:cacheprovider", "-k", k, f"--benchmark-json={report}",
                "--benchmark-max-time=0.2", "--benchmark-min-rounds=3",
            ]  # fmt: skip
            if args.smoke:
                bench_cmd += ["--benchmark-disable-gc", "-x"]
            results.append(
                run_part(name, bench_cmd, out, left(share), cwd, {ROWS_ENV: str(rows_file)})
            )
            rows_files.append(rows_file)

    notes = {
        "env": ", ".join(f"{k}={v}" for k, v in env.items()),
    }
    if not args.parts:
        notes["graph"] = json.dumps(last_json_line(out / "graph.log"))
    if "digits-job" in jobs:
        notes["digits-job"] = json.dumps(digits_job_figures(out / "digits-job"))
    if "profile" in jobs:
        notes["profile"] = f"{len(profile_rows(out / 'profile.log'))} cases (table below)"
    summary = [
        [r["part"], r["status"], f"{r['seconds']:.0f} s",
         notes.get(r["part"]) or pytest_summary(r["log"])]
        for r in results
    ]  # fmt: skip
    print()
    print(format_table(["part", "status", "time", "result"], summary))
    rows = [row for f in rows_files if f.exists() for row in bench_rows(f)]
    if rows:
        print()
        header = ["benchmark", "median", *[label for _, label in FIGURES]]
        print(format_table(header, rows))
    if "profile" in jobs:
        print()
        print(format_table(PROFILE_HEADER, profile_rows(out / "profile.log")))
    print(f"\nlogs: {out}")
    return 0 if all(r["status"] == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
