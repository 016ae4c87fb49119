"""benchmarks/gpu_check.py runs its parts and prints its table (on the CPU: --smoke)."""

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
