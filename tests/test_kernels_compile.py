"""Every kernel compiles ahead of time to PTX + cubin for sm_80 and sm_90, for each dtype.

The compilation runs once per session in a subprocess without TRITON_INTERPRET (see
tests/aot_compile.py), so a kernel that only the interpreter accepts fails here.  The PTX also
shows how the noise is made: Philox calls per element, and which approximate instructions
the compiled noise uses (kernels.reference.noise_bound is derived for exactly those).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("aot_compile.py")
NOISE_KERNELS = {"q_sample", "noise_loss_fwd", "noise_loss_bwd", "reverse_step"}
#: Kernels of the memory-bound family that read no noise at all.
NOISE_FREE = {"dpm_solver_step"}
#: Kernels whose own arithmetic divides and takes square roots, correctly rounded (the DDIM
#: step matches its torch reference bit for bit in the interpreter), and those instructions.
PRECISE_MATH_KERNELS = {"ddim_step"}
PRECISE_MATH = {"sqrt.rn.f32", "div.rn.f32"}
GROUP_NORM_KERNELS = {
    "group_norm_stats",
    "group_norm_fwd",
    "group_norm_bwd_stats",
    "group_norm_bwd",
}
#: fp32-only kernels (their pointers never carry the activation dtype).
DTYPE_FREE = {"group_norm_combine", "group_norm_bwd_combine"}
#: The approximate instructions noise_bound assumes (sqrt may also be exact).
NOISE_MATH = {"lg2.approx.ftz.f32", "sin.approx.ftz.f32", "cos.approx.ftz.f32"}
SQRT = {"sqrt.approx.ftz.f32", "sqrt.approx.f32", "sqrt.rn.f32", "sqrt.rn.ftz.f32"}

pytestmark = pytest.mark.slow  # one subprocess compiling ~200 kernels: about a minute


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def kernels(report):
    return [c for c in report if "kernel" in c]


def test_every_kernel_dtype_and_arch_compiles(report):
    cases = kernels(report)
    every = NOISE_KERNELS | NOISE_FREE | PRECISE_MATH_KERNELS | GROUP_NORM_KERNELS | DTYPE_FREE
    assert {c["kernel"] for c in cases} == every
    for name in every:
        dtypes = ("fp32",) if name in DTYPE_FREE else ("fp32", "bf16", "fp16")
        assert {(c["dtype"], c["sm"]) for c in cases if c["kernel"] == name} == {
            (d, s) for d in dtypes for s in (80, 90)
        }, name
    failed = [c for c in cases if "error" in c]
    assert not failed, failed
    assert all(c["target_ok"] and c["cubin_bytes"] > 0 for c in cases)


def test_memory_bound_loads_are_vectorised(report):
    """16-byte loads where rows allow them; 8 bytes for 16-bit NHWC4 (rows of 12 elements).
    Kernels without noise ("dense": the DPM-Solver++ step) read any dense tensor flat."""
    for c in kernels(report):
        if (
            c["kernel"] in GROUP_NORM_KERNELS
            or c.get("tile") in ("flat4", "explicit_noise", "dense")
            or (c.get("tile") == "nhwc4" and c["dtype"] == "fp32")
        ):
            assert c["load_vector_bytes"] == 16, c
        elif c.get("tile") == "nhwc4":
            assert c["load_vector_bytes"] == 8, c


def test_no_register_spills(report):
    measured = [c for c in kernels(report) if "reg" in c]
    if not measured:
        pytest.skip("cuobjdump not available to read register usage")
    assert all(c["stack"] == 0 for c in measured), [c for c in measured if c["stack"]]
    assert max(c["reg"] for c in measured) <= 128, max(measured, key=lambda c: c["reg"])


def test_noise_makes_one_philox_call_per_four_elements(report):
    """Per thread: 2 lg2 (two Box-Muller pairs) and the mul.hi of one Philox call (measured on
    a probe kernel) per four elements in the FLAT4 and NHWC4 tiles; four times that per
    element in the GENERIC tiles (odd sizes)."""
    probes = {c["sm"]: c for c in report if c.get("probe") == "philox_call"}
    assert probes and all(p["lg2"] == 2 for p in probes.values()), probes
    seeded = [c for c in kernels(report) if c.get("seeded")]
    assert {c["tile"] for c in seeded} == {"flat4", "nhwc4", "generic_nchw", "generic_nhwc"}
    for c in seeded:
        calls = (
            c["elems_per_thread"] / 4 if c["tile"] in ("flat4", "nhwc4") else c["elems_per_thread"]
        )
        assert c["lg2"] == 2 * calls, c
        per_call = probes[c["sm"]]["mulhi"]
        assert 0.8 * per_call * calls <= c["mulhi"] <= 1.2 * per_call * calls, (c, per_call)


def test_noise_uses_the_approximations_noise_bound_assumes(report):
    """The seeded noise uses exactly NOISE_MATH (and a sqrt); everything else is exact: no
    approximate instruction at all, and in the DDIM step correctly rounded sqrt and division
    (``tl.sqrt_rn`` / ``tl.div_rn``; ``tl.sqrt`` and ``/`` would be sqrt.approx / div.full)."""
    for c in kernels(report):
        own = PRECISE_MATH if c["kernel"] in PRECISE_MATH_KERNELS else set()
        if c.get("seeded"):
            assert NOISE_MATH | own <= set(c["math"]) <= NOISE_MATH | SQRT | own, c
            assert not c["calls"], c  # nothing left to libdevice calls
        elif c["kernel"] in NOISE_KERNELS | NOISE_FREE | PRECISE_MATH_KERNELS:
            assert set(c["math"]) == own and c["mulhi"] == 0, c  # no generator at all


def test_x0_clipping_compiles(report):
    """The CLIP_X0 path of the reverse step (DDPM's clip_denoised), the DPM-Solver++ step
    and the DDIM step (rederive rule), every dtype and arch."""
    clipped = [c for c in kernels(report) if c.get("clip_x0")]
    assert {(c["kernel"], c["dtype"], c["sm"]) for c in clipped} == {
        (k, d, s)
        for k in ("reverse_step", "dpm_solver_step", "ddim_step")
        for d in ("fp32", "bf16", "fp16")
        for s in (80, 90)
    }
    assert not [c for c in clipped if "error" in c]


def test_guided_sampler_steps_compile(report):
    """The GUIDED path of the reverse step, the DPM-Solver++ step and the DDIM step
    (classifier-free guidance's second prediction, an image-dtype pointer, and the fp32
    scale), every dtype and arch, vectorised like pred."""
    guided = [c for c in kernels(report) if c.get("guided")]
    assert {(c["kernel"], c["dtype"], c["sm"]) for c in guided} == {
        (k, d, s)
        for k in ("reverse_step", "dpm_solver_step", "ddim_step")
        for d in ("fp32", "bf16", "fp16")
        for s in (80, 90)
    }
    assert not [c for c in guided if "error" in c]


def test_ddim_step_compiles_every_variant(report):
    """The DDIM step with no option, guided, clipped, with a given noise tensor and with noise
    from the seed (FLAT4; NHWC4 with guidance and clipping too), every dtype and arch."""
    ddim = [c for c in kernels(report) if c["kernel"] == "ddim_step"]
    variants = {(c["tile"], c.get("guided", False), c.get("clip_x0", False),
                 c.get("add_noise", False), c["seeded"]) for c in ddim}  # fmt: skip
    assert variants == {
        ("dense", False, False, False, False),
        ("dense", True, False, False, False),
        ("dense", False, True, False, False),
        ("explicit_noise", False, False, True, False),
        ("flat4", False, False, True, True),
        ("nhwc4", True, True, True, True),
    }
    assert len(ddim) == len(variants) * 3 * 2  # every dtype, sm_80 and sm_90
    assert not [c for c in ddim if "error" in c]


FRONTEND_SCRIPT = Path(__file__).with_name("frontend_compile.py")


@pytest.fixture(scope="module")
def frontend():
    """tests/frontend_compile.py's report: each kernel lowered with its int arguments as a
    launch specialises them, and one Philox call lowered in debug mode (a few seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(FRONTEND_SCRIPT)], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_kernels_compile_with_any_int_argument_equal_to_1(frontend):
    """Triton's launcher makes an int argument equal to 1 a constexpr (GroupNorm's backward
    with H = W = 1 and one channel per group once failed to compile: ``(HW * Cg).to``)."""
    rows = frontend["specialised_to_1"]
    assert {r["kernel"] for r in rows} >= NOISE_KERNELS | GROUP_NORM_KERNELS | NOISE_FREE
    assert any(r["kernel"] == "group_norm_bwd" and {"HW", "Cg"} <= set(r["ones"]) for r in rows)
    failed = [r for r in rows if "error" in r]
    assert not failed, failed


def test_philox_lowers_without_overflow_asserts_in_debug_mode(frontend):
    """Philox wraps around mod 2^32; in debug mode (TRITON_DEBUG=1) every unsanitised 32-bit
    add or mul becomes a device-side overflow assert that fires on every call."""
    assert frontend["philox_debug"] == {"overflow_asserts": 0, "asserts": 0}


def test_noise_loss_subtracts_the_rounded_eps(report):
    """noise_loss compiles without FP fusion (kernels.noise_loss.COMPILE_OPTIONS): fused,
    pred - R cos(theta) becomes an fma on the unrounded product, so the loss would see an eps
    0.5 ulp off q_sample's from the same seed, and differ between tile layouts."""
    cases = [c for c in kernels(report) if c["kernel"] in ("noise_loss_fwd", "noise_loss_bwd")]
    assert cases and all("error" not in c for c in cases)
    assert all(c["fma_f32"] == 0 for c in cases), [(c["tile"], c["fma_f32"]) for c in cases]
    assert any(c["fma_f32"] > 0 for c in kernels(report) if c["kernel"] == "q_sample")
