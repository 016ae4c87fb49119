"""benchmarks/gpu_check.py runs its parts and prints its table (on the CPU: --smoke)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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


def collected(path: str, k: str) -> set[str]:
    """The benchmark ids ``pytest --collect-only -k k`` selects in benchmarks/<path>."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         str(ROOT / "benchmarks" / path), "-k", k],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return {ln.split("::")[-1] for ln in proc.stdout.splitlines() if "::" in ln}


def test_bench_parts_select_the_cuda_cases_once():
    """The parts' -k expressions (CUDA cases are collected, then skipped, on a CPU): the
    default parts pick the op table, the 6 core training cases and every CUDA sampling case;
    with --full's parts, every CUDA training case is in exactly one part."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    got = {name: collected(path, k) for name, path, k, _ in gpu_check.BENCH_PARTS
           + gpu_check.FULL_PARTS}  # fmt: skip
    if importlib.util.find_spec("diffusers") is None:  # its benchmark module skips itself
        assert got.pop("bench-diffusers") == set()
    assert all(got.values()), got
    assert all("cuda" in i for ids in got.values() for i in ids)
    core = got["bench-train"]
    assert len(core) == 6 and all("bf16-channels_last" in i for i in core), core
    train = collected("test_bench_train_sample.py", "test_train_step and cuda")
    assert core | got["bench-train-more"] == train and not core & got["bench-train-more"]
    assert got["bench-sample"] == collected("test_bench_train_sample.py", "test_sample and cuda")
    assert got["bench-ops"] == collected("test_bench_ops.py", "cuda")
