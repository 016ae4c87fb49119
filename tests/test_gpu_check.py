"""benchmarks/gpu_check.py runs its parts and prints its table (on the CPU: --smoke)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke",
         "--out", str(tmp_path / "out"), "--bench-k", "test_q_sample and cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for part in ("env", "tests", "graph", "bench"):
        assert any(ln.startswith(part) and "| pass" in ln for ln in lines), proc.stdout
    assert any("test_q_sample[" in ln and " ms" in ln for ln in lines), proc.stdout
    assert (tmp_path / "out" / "bench.json").is_file()
    rows = (tmp_path / "out" / "bench.rows.jsonl").read_text().splitlines()
    assert rows and all("test_q_sample[" in r for r in rows), rows


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_check


def test_a_part_without_time_for_its_start_is_not_started(tmp_path):
    gpu_check = _gpu_check()
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    short = gpu_check.run_part("p", cmd, tmp_path, gpu_check.MIN_PART_S - 1, tmp_path)
    assert short["status"] == "SKIPPED (no time)" and not marker.exists()
    ran = gpu_check.run_part("p", cmd, tmp_path, gpu_check.MIN_PART_S, tmp_path)
    assert ran["status"] == "pass" and marker.exists()


def test_bench_rows_read_what_a_killed_part_left(tmp_path):
    """Rows are appended as each benchmark ends: a part killed mid-line keeps the lines
    before; seconds per step show as ms/step."""
    gpu_check = _gpu_check()
    rows_file = tmp_path / "part.rows.jsonl"
    rows_file.write_text(
        '{"name": "a", "median": 0.002, "extra_info": {"gb_per_s": 900.5, "s_per_step": 0.0185}}\n'
        '{"name": "b", "median": null, "extra_info": {}}\n'
        '{"name": "c", "med'
    )
    rows = gpu_check.bench_rows(rows_file)
    header = ["benchmark", "median", *[label for _, label in gpu_check.FIGURES]]
    table = [dict(zip(header, r, strict=True)) for r in rows]
    assert [r["benchmark"] for r in table] == ["a", "b"]
    assert table[0]["median"] == "2.000 ms" and table[0]["GB/s"] == "900.5"
    assert table[0]["ms/step"] == "18.5" and table[1]["median"] == "-"


def test_a_failed_benchmark_row_is_marked(tmp_path):
    """A row whose test failed after timing (e.g. a fallback found) or whose set-up failed is
    named FAILED; a test that skipped itself is not."""
    gpu_check = _gpu_check()
    rows_file = tmp_path / "part.rows.jsonl"
    rows_file.write_text(
        '{"name": "ok", "median": 0.001, "extra_info": {}, "outcome": "passed"}\n'
        '{"name": "bad", "median": 0.001, "extra_info": {}, "outcome": "failed"}\n'
        '{"name": "unset", "median": null, "extra_info": {}, "outcome": "error"}\n'
        '{"name": "skip", "median": null, "extra_info": {}, "outcome": "skipped"}\n'
    )
    names = [r[0] for r in gpu_check.bench_rows(rows_file)]
    assert names == ["ok", "bad FAILED", "unset FAILED", "skip"]


def test_job_parts_run_the_default_job_and_the_profile(tmp_path):
    """``--parts digits-job,profile`` (smoke: 20 CPU steps, tiny profile cases): the job's
    training time and steps come from its metrics.jsonl, the profile prints one row per case."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--skip-tests",
         "--out", str(tmp_path / "out"), "--parts", "digits-job,profile"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    job = next(ln for ln in lines if ln.startswith("digits-job"))
    assert "| pass" in job and '"steps": 20' in job and '"train_s": ' in job, job
    for case in ("train-tiny", "sample-tiny"):
        assert any(ln.startswith(case + " ") for ln in lines), proc.stdout
    assert not any(ln.startswith("bench") for ln in lines), proc.stdout


def test_parts_option_rejects_an_unknown_part(capsys):
    gpu_check = _gpu_check()
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--parts", "bench-ops,bench-nope"])
    assert exc.value.code == 2 and "bench-nope" in capsys.readouterr().err


def test_digits_job_figures_from_metrics(tmp_path):
    """train_s = last window's end - first window's end + the first window's own length
    (50 steps x 64 images / its images/s); a job cut before 5000 steps also says what the
    whole would take at its pace; a run without windows reports 0 steps."""
    gpu_check = _gpu_check()
    assert gpu_check.digits_job_figures(tmp_path) == {"steps": 0}
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 50, "loss": 1.0, "images_per_s": 1600.0, "time": 1000.0}\n'
        '{"step": 100, "loss": 0.5, "images_per_s": 3200.0, "time": 1001.0}\n'
        '{"event": "checkpoint"}\n'
    )
    got = gpu_check.digits_job_figures(tmp_path)
    assert got == {"steps": 100, "train_s": 3.0, "last_images_per_s": 3200.0,
                   "complete": False, "projected_train_s": 150.0}  # fmt: skip
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5000, "images_per_s": 3200.0, "time": 1099.0}\n')
    got = gpu_check.digits_job_figures(tmp_path)
    assert got["complete"] and got["train_s"] == 101.0 and "projected_train_s" not in got


def test_profile_kernel_table_counts_device_events_only():
    """gpu_profile.kernel_table over hand-made events: CPU events and device-side user
    annotations are ignored; per call, the kernel count, the summed device time, and the
    kernels ranked by their total time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_profile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def ev(name, us, dev=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=dev,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))  # fmt: skip

    annotation = ev("Optimizer.step#AdamW.step", 900.0)  # its device-side copy spans kernels
    annotation.is_user_annotation = True
    events = [ev("gemm", 300.0), ev("gemm", 300.0), ev("norm", 100.0), ev("norm", 100.0),
              ev("norm", 100.0), ev("aten::conv2d", 5000.0, DeviceType.CPU),
              annotation]  # fmt: skip
    count, device_ms, top = gpu_profile.kernel_table(events, calls=2)
    assert count == 2.5 and device_ms == 0.45
    assert [(r["kernel"], r["ms_per_step"], r["calls_per_step"]) for r in top] == [
        ("gemm", 0.3, 1.0),
        ("norm", 0.15, 1.5),
    ]


#: A pytest plugin for a collect-only child over benchmarks/: for each (file, -k expression) in
#: FASTDIFF_SELECT_IN, the ids pytest itself would run (its own keyword matcher and expression
#: parser, as ``pytest benchmarks/<file> -k <expr>`` applies them), so that one collection
#: answers every part instead of one child process per expression.
_SELECT = """
import json, os
from _pytest.mark import KeywordMatcher
from _pytest.mark.expression import Expression

def pytest_collection_finish(session):
    queries = json.loads(os.environ["FASTDIFF_SELECT_IN"])
    out = []
    for path, k in queries:
        expr = Expression.compile(k)
        out.append(sorted(
            item.name for item in session.items
            if item.path.name == path and expr.evaluate(KeywordMatcher.from_item(item))
        ))
    with open(os.environ["FASTDIFF_SELECT_OUT"], "w") as f:
        json.dump(out, f)
"""


def collected_many(tmp_path: Path, queries: list[tuple[str, str]]) -> list[set[str]]:
    """For each (file, k): the benchmark ids ``pytest benchmarks/<file> -k k`` selects, from one
    ``pytest --collect-only benchmarks`` child."""
    import json

    (tmp_path / "select_probe.py").write_text(_SELECT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["FASTDIFF_SELECT_IN"] = json.dumps(queries)
    env["FASTDIFF_SELECT_OUT"] = str(tmp_path / "selected.json")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "select_probe", str(ROOT / "benchmarks")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [set(ids) for ids in json.loads((tmp_path / "selected.json").read_text())]


def test_bench_parts_select_the_cuda_cases_once(tmp_path):
    """The parts' -k expressions (CUDA cases are collected, then skipped, on a CPU): the
    default parts pick the op table (without the sampler-step ops), the 8 core training cases,
    every CUDA sampling case (guided too) and every diffusers anchor; with --full's parts,
    every CUDA training case and every CUDA op case is in exactly one part."""
    gpu_check = _gpu_check()
    parts = gpu_check.BENCH_PARTS + gpu_check.FULL_PARTS
    references = [
        ("test_bench_train_sample.py", "test_train_step and cuda"),
        ("test_bench_train_sample.py", "cuda and not test_train_step"),
        ("test_bench_ops.py", "cuda"),
    ]
    *selected, train, sample, ops = collected_many(
        tmp_path, [(path, k) for _, path, k, _ in parts] + references
    )
    got = {name: ids for (name, *_), ids in zip(parts, selected, strict=True)}
    if importlib.util.find_spec("diffusers") is None:  # its benchmark module skips itself
        assert got.pop("bench-diffusers") == set()
    else:
        anchors = got["bench-diffusers"]
        for impl in ("diffusers_example", "diffusers_tuned", "diffusers_bf16_weights-"):
            assert any(impl.rstrip("-") in i and "cuda" in i for i in anchors), (impl, anchors)
    assert all(got.values()), got
    assert all("cuda" in i for ids in got.values() for i in ids)
    core = got["bench-train"]
    assert len(core) == 8 and all("channels_last" in i for i in core), core
    assert {i for i in core if "bf16" not in i} == {
        f"test_train_step[cuda-cifar10-b128-{p}-channels_last-fastdiff_graph]"
        for p in ("fp32", "fp16")
    }
    more, compiled = got["bench-train-more"], got["bench-compile"]
    assert core | more | compiled == train
    assert not (core & more or core & compiled or more & compiled)
    assert all("compile" in i for i in compiled) and not any("compile" in i for i in more)
    assert got["bench-sample"] == sample and any("test_guided_sample" in i for i in sample)
    samplers = got["bench-ops-samplers"]
    assert got["bench-ops"] | samplers == ops and not got["bench-ops"] & samplers
    assert all("sampler_step" in i for i in samplers)
    assert [name for name, *_ in gpu_check.BENCH_PARTS] == gpu_check.part_names(full=False)


#: A pytest plugin for a collect-only child: writes, for every collected test, whether it is
#: CUDA-only: a skipif whose condition (a string) or reason names CUDA, or a ``cuda`` marker.
_PROBE = """
import json, os

def _cuda_only(item):
    if item.get_closest_marker("cuda") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        text = " ".join(str(a) for a in mark.args if isinstance(a, str))
        text += " " + str(mark.kwargs.get("reason", ""))
        if "cuda" in text.lower():
            return True
    return False

def pytest_collection_finish(session):
    with open(os.environ["FASTDIFF_PROBE_OUT"], "w") as f:
        json.dump({item.nodeid: _cuda_only(item) for item in session.items}, f)
"""


def _collect_suite(tmp_path: Path) -> dict[str, bool]:
    """``pytest --collect-only tests`` (from the checkout, with the probe plugin): every test's
    node id, and whether it is CUDA-only."""
    import json

    (tmp_path / "cuda_probe.py").write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["FASTDIFF_PROBE_OUT"] = str(tmp_path / "suite.json")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "cuda_probe", "tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "suite.json").read_text())


def _selects(args: list[str], nodeid: str) -> bool:
    """Whether pytest run with the path / node-id arguments ``args`` (absolute, no options)
    runs the test ``nodeid`` (relative to the checkout): a file selects its tests, a node id
    itself, its parametrizations and, for a class, its methods."""
    for arg in args:
        rel = Path(arg.split("::")[0]).relative_to(ROOT).as_posix()
        rel += arg[len(arg.split("::")[0]) :]
        if nodeid == rel or nodeid.startswith((rel + "::", rel + "[")):
            return True
    return False


def test_tests_part_selects_every_cuda_only_test(tmp_path):
    """gpu_check's ``tests`` part (its exact pytest arguments, matched against the collected
    suite) runs every test of the suite that only runs with CUDA (a skipif naming CUDA: the
    clipped graph samplers, the bf16 sampling copy, the captured training step, the hot
    loop, ...), and every file whose tests run on helpers.DEVICE (the kernels on CUDA tensors
    when a GPU is present) in full.  That each argument names an existing test is what the
    smoke run above checks (pytest stops with "not found" otherwise)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    suite = _collect_suite(tmp_path)
    args = gpu_check.tests_part_args()
    assert args and not any(a.startswith("-") for a in args), args
    cuda_only = {nodeid for nodeid, only in suite.items() if only}
    # The probe finds the known ones (so an empty set cannot pass unnoticed).
    for known in ["tests/test_training.py::test_cuda_hot_loop_does_not_synchronise[fp32]",
                  "tests/test_ddpm_clip.py::test_clipped_samplers_replay_without_host_syncs",
                  "tests/test_low_precision.py::"
                  "test_cuda_bf16_sampling_uses_the_copy_and_keeps_the_model",
                  "tests/test_sampling.py::test_cuda_graph_matches_eager",
                  "tests/test_train_graph.py::test_graph_resume_is_exact_on_cuda"]:  # fmt: skip
        assert any(n == known or n.startswith(known + "[") for n in cuda_only), known
    missing = sorted(n for n in cuda_only if not _selects(args, n))
    assert not missing, f"CUDA-only tests gpu_check's tests part does not run: {missing}"
    on_device = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").glob("test_*.py")
        if any(
            line.startswith("from helpers import") and "DEVICE" in line
            for line in path.read_text().splitlines()
        )
    }
    partial = sorted(
        f for f in on_device if not all(_selects(args, n) for n in suite if n.startswith(f + "::"))
    )
    assert not partial, f"files testing on helpers.DEVICE not run in full: {partial}"
    smoke = gpu_check.tests_part_args(smoke=True)
    assert smoke == [*args, "-k", gpu_check.SMOKE_K]


def test_failures_plugin_writes_each_failure_once_under_xdist(tmp_path):
    """tools/pytest_failures_plugin.py (what tools/gpu_session.sh loads): with two xdist
    workers, the failing test and the failing fixture are in the log once each, with their
    tracebacks; the passing test is not."""
    # The probe: one passing test (which must not be logged), one failing, one set-up error.
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('fixture-broke')\n\n"
        "def test_ok():\n    assert 2 + 2 == 4\n\n"
        "def test_bad():\n    assert 1 == 2, 'one-is-not-two'\n\n"
        "def test_setup(broken):\n    pass\n"
    )
    log = tmp_path / "failures.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tools"), env.get("PYTHONPATH", "")])
    env["GPU_SESSION_FAILURES_LOG"] = str(log)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "pytest_failures_plugin", "-n", "2", "test_probe.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = log.read_text()
    heads = [ln for ln in text.splitlines() if ln.startswith("#### ")]
    assert len(heads) == 2, text
    assert any(h.startswith("#### FAILED test_probe.py::test_bad (call)") for h in heads), heads
    assert any(h.startswith("#### ERROR test_probe.py::test_setup (setup)") for h in heads), heads
    assert "one-is-not-two" in text and "fixture-broke" in text and "test_ok" not in text
