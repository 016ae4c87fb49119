"""The benchmark suite runs (each benchmark once, untimed), so it cannot rot unnoticed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_suite_runs_once():
    # tests/conftest.py sets TRITON_INTERPRET=1 for this process; the benchmarks must see the
    # default dispatch (reference on CPU, Triton on CUDA), so the child gets neither variable.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    # With a GPU, the CUDA cases (whole training runs, Inductor compiles, device-time tables:
    # minutes) are benchmarks/gpu_check.py's, with time shares of their own; here the rest.
    only = ["-k", "not cuda"] if torch.cuda.is_available() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-disable", "-q"]
        + ["-p", "no:cacheprovider", *only],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 3, output
    assert " failed" not in output and " error" not in output, output
    if not torch.cuda.is_available():
        assert re.search(r"\d+ skipped", output), output
        assert "CUDA is not available" in output, output
