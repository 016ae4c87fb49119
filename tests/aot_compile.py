"""Compile every fastdiff kernel ahead of time for sm_80 and sm_90; print a JSON report.

Run as a script, in a process where TRITON_INTERPRET is unset (under the interpreter,
@triton.jit functions cannot be compiled).  ``tests/test_kernels_compile.py`` runs it once and
checks the report.  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``
lowers a kernel through TTIR/TTGIR/LLVM to PTX and a cubin with no GPU present.  The attributes
mark pointers and n_per as 16-divisible, as Triton's launcher specialises them for aligned
tensors, so the PTX shows whether global loads are vectorised.
"""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastdiff.kernels.noise_loss import noise_loss_bwd_kernel, noise_loss_fwd_kernel  # noqa: E402
from fastdiff.kernels.q_sample import q_sample_kernel  # noqa: E402
from fastdiff.kernels.reverse_step import reverse_step_kernel  # noqa: E402

DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
ARCHS = (80, 90)
SCALARS = {"n_per": "i32", "C": "i32", "HW": "i32", "blocks_per_sample": "i32"}
CONSTEXPRS = ("BLOCK", "CHANNELS_LAST", "NOISE_FROM_SEED")
# Pointer arguments: "img" takes the image dtype; the rest are fixed.
KERNELS = {
    "q_sample": (
        q_sample_kernel,
        {
            "x_ptr": "img",
            "noise_ptr": "img",
            "out_ptr": "img",
            "t_ptr": "*i64",
            "sqrt_ac_ptr": "*fp32",
            "sqrt_1m_ac_ptr": "*fp32",
            "seed_ptr": "*i64",
        },
    ),
    "noise_loss_fwd": (
        noise_loss_fwd_kernel,
        {"pred_ptr": "img", "noise_ptr": "img", "partial_ptr": "*fp32", "seed_ptr": "*i64"},
    ),
    "noise_loss_bwd": (
        noise_loss_bwd_kernel,
        {
            "pred_ptr": "img",
            "noise_ptr": "img",
            "grad_ptr": "img",
            "scale_ptr": "*fp32",
            "seed_ptr": "*i64",
        },
    ),
    "reverse_step": (
        reverse_step_kernel,
        {
            "z_ptr": "img",
            "pred_ptr": "img",
            "noise_ptr": "img",
            "out_ptr": "img",
            "t_ptr": "*i64",
            "coef_z_ptr": "*fp32",
            "coef_eps_ptr": "*fp32",
            "sigma_ptr": "*fp32",
            "seed_ptr": "*i64",
        },
    ),
}


def compile_kernel(name, dtype, cap, channels_last, from_seed, block=1024):
    fn, pointers = KERNELS[name]
    signature = {k: (DTYPES[dtype] if v == "img" else v) for k, v in pointers.items()}
    signature.update(SCALARS)
    signature.update(dict.fromkeys(CONSTEXPRS, "constexpr"))
    if list(signature) != fn.arg_names:
        raise AssertionError(f"{name}: signature here {list(signature)} != {fn.arg_names}")
    aligned = [i for i, a in enumerate(fn.arg_names) if a.endswith("_ptr") or a == "n_per"]
    src = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={"BLOCK": block, "CHANNELS_LAST": channels_last, "NOISE_FROM_SEED": from_seed},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    return triton.compile(src, target=GPUTarget("cuda", cap, 32))


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes of a cubin, read with cuobjdump (shipped with Triton)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    found = {k: re.search(rf"{k}:(\d+)", out) for k in ("REG", "STACK")}
    return {k.lower(): int(m.group(1)) for k, m in found.items() if m}


def main() -> None:
    report = []
    for name, dtype, cap, cl, seeded in itertools.product(
        KERNELS, DTYPES, ARCHS, (False, True), (False, True)
    ):
        case = {"kernel": name, "dtype": dtype, "sm": cap, "channels_last": cl, "seeded": seeded}
        try:
            compiled = compile_kernel(name, dtype, cap, cl, seeded)
        except Exception as exc:  # reported, and failed, by the test
            case["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        else:
            ptx = compiled.asm["ptx"]
            case.update(
                cubin_bytes=len(compiled.asm["cubin"]),
                target_ok=f".target sm_{cap}" in ptx,
                vector_loads="ld.global.v4" in ptx,
                **resource_usage(compiled.asm["cubin"]),
            )
        report.append(case)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
