"""Every kernel compiles ahead of time to PTX + cubin for sm_80 and sm_90, for each dtype.

The compilation runs once per session in a subprocess without TRITON_INTERPRET (see
tests/aot_compile.py), so a kernel that only the interpreter accepts fails here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("aot_compile.py")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_kernel_dtype_and_arch_compiles(report):
    kernels = {c["kernel"] for c in report}
    assert kernels == {"q_sample", "noise_loss_fwd", "noise_loss_bwd", "reverse_step"}
    assert {(c["dtype"], c["sm"]) for c in report} == {
        (d, s) for d in ("fp32", "bf16", "fp16") for s in (80, 90)
    }
    failed = [c for c in report if "error" in c]
    assert not failed, failed
    assert all(c["target_ok"] and c["cubin_bytes"] > 0 for c in report)


def test_contiguous_image_loads_are_vectorised(report):
    """Aligned contiguous inputs must load 16 bytes per instruction (memory-bound kernels)."""
    plain = [c for c in report if not c["channels_last"] and "error" not in c]
    assert plain and all(c["vector_loads"] for c in plain), [
        c for c in plain if not c["vector_loads"]
    ]


def test_no_register_spills(report):
    measured = [c for c in report if "reg" in c]
    if not measured:
        pytest.skip("cuobjdump not available to read register usage")
    assert all(c["stack"] == 0 for c in measured), [c for c in measured if c["stack"]]
    assert max(c["reg"] for c in measured) <= 128
