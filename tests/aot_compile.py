"""Compile every fastdiff kernel ahead of time for sm_80 and sm_90; print a JSON report.

Run as a script, in a process where TRITON_INTERPRET is unset (under the interpreter,
@triton.jit functions cannot be compiled).  ``tests/test_kernels_compile.py`` runs it once and
checks the report.  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``
lowers a kernel through TTIR/TTGIR/LLVM to PTX and a cubin with no GPU present.  Pointers and
n_per are marked 16-divisible, as Triton's launcher specialises them for aligned tensors, so
the PTX shows whether global loads are vectorised.

Each case takes its constexprs (tile layout, ROWS, W, NCH, num_warps) from the launchers' own
``layout_args`` for a representative tensor, so what compiles here is what a GPU launches.
The report also counts, per thread, the Philox calls (``mul.hi.u32`` in the PTX divided by
the count of one call, measured on a probe kernel) and the elements handled, and lists the
approximate-math and libdevice instructions the noise uses (kernels.reference.noise_bound is
derived for exactly those).  ``python tests/aot_compile.py --quick`` compiles sm_90 only.
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

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastdiff.kernels import common, group_norm, noise_loss  # noqa: E402
from fastdiff.kernels.ddim import ddim_step_kernel  # noqa: E402
from fastdiff.kernels.dpm_solver import dpm_solver_step_kernel  # noqa: E402
from fastdiff.kernels.noise_loss import noise_loss_bwd_kernel, noise_loss_fwd_kernel  # noqa: E402
from fastdiff.kernels.q_sample import q_sample_kernel  # noqa: E402
from fastdiff.kernels.reverse_step import reverse_step_kernel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARCHS = (80, 90)
#: Pointer arguments that hold image-like data (the case's dtype); t and seed are int64;
#: every other pointer is an fp32 table or buffer.
IMAGE_POINTERS = {
    "x_ptr",
    "noise_ptr",
    "out_ptr",
    "z_ptr",
    "pred_ptr",
    "uncond_ptr",
    "grad_ptr",
    "dout_ptr",
    "dx_ptr",
    "x0_ptr",
}
INT64_POINTERS = {"t_ptr", "t_prev_ptr", "seed_ptr", "step_ptr"}
NOISE_KERNELS = {
    "q_sample": q_sample_kernel,
    "noise_loss_fwd": noise_loss_fwd_kernel,
    "noise_loss_bwd": noise_loss_bwd_kernel,
    "reverse_step": reverse_step_kernel,
}
#: (name, shape, channels_last, seeded, archs): one per tile layout of kernels.common; the
#: rarely taken layouts compile for sm_90 only (compile time), the hot ones for both.
NOISE_CASES = (
    ("flat4", (64, 3, 256, 256), False, True, ARCHS),
    ("nhwc4", (64, 3, 256, 256), True, True, ARCHS),
    ("generic_nchw", (8, 3, 17, 13), False, True, (90,)),
    ("generic_nhwc", (8, 3, 17, 13), True, True, (90,)),
    ("explicit_noise", (64, 3, 256, 256), True, False, ARCHS),
)
#: The sampler steps' variants, as (tile, channels_last, constexpr flags), every dtype and arch.
#: Without noise from a seed a dense tensor is one flat tile (LAYOUT 0, whatever its memory
#: format), "dense" (no noise) or "explicit_noise".  The DPM-Solver++ step reads no noise:
#: plain, with x0 clipping, and guided.  The DDIM step: the same three (clipping with the
#: rederive rule, its extra term), a given noise tensor, and noise from the seed in the FLAT4
#: tile and in the NHWC4 tile with guidance and clipping (every flag on: the most registers).
STEP_FLAGS = ("GUIDED", "CLIP_X0", "REDERIVE", "ADD_NOISE", "NOISE_FROM_SEED")
_SEEDED = {"ADD_NOISE": True, "NOISE_FROM_SEED": True}
_CLIP = {"CLIP_X0": True, "REDERIVE": True}
STEP_KERNELS = {
    "dpm_solver_step": (
        dpm_solver_step_kernel,
        {"scale": "fp32"},
        (
            ("dense", False, {}),
            ("dense", False, {"CLIP_X0": True}),
            ("dense", False, {"GUIDED": True}),
        ),
    ),
    "ddim_step": (
        ddim_step_kernel,
        {"eta": "fp32", "guidance": "fp32"},
        (
            ("dense", False, {}),
            ("dense", False, {"GUIDED": True}),
            ("dense", False, _CLIP),
            ("explicit_noise", False, {"ADD_NOISE": True}),
            ("flat4", False, _SEEDED),
            ("nhwc4", True, {**_SEEDED, **_CLIP, "GUIDED": True}),
        ),
    ),
}
APPROX = re.compile(r"\b(?:lg2|ex2|sin|cos|sqrt|rsqrt|rcp|div|tanh)\.(?:approx|full|rn)[.\w]*")


def signature_of(fn, dtype: torch.dtype, constexprs: dict, scalar_types: dict | None = None):
    """Triton signature for ``fn``: pointer types by argument name, i32 scalars, constexprs."""
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in IMAGE_POINTERS:
            sig[name] = ptr
        elif name in INT64_POINTERS:
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = (scalar_types or {}).get(name, "i32")
    return sig


#: Kernels launched with compile options of their own (as their launchers pass them).
LAUNCH_OPTIONS = {
    noise_loss_fwd_kernel: noise_loss.COMPILE_OPTIONS,
    noise_loss_bwd_kernel: noise_loss.COMPILE_OPTIONS,
}


def compile_fn(fn, signature: dict, constexprs: dict, cap: int, num_warps: int, aligned=()):
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(fn.arg_names)
        if a.endswith("_ptr") or a in aligned
    }
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, **LAUNCH_OPTIONS.get(fn, {})}
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack bytes and the count of SASS instructions (NOPs excluded) of a cubin,
    read with cuobjdump (shipped with Triton)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out, sass = (
            subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout
            for flag in ("--dump-resource-usage", "-sass")
        )
    found = {k: re.search(rf"{k}:(\d+)", out) for k in ("REG", "STACK")}
    report = {k.lower(): int(m.group(1)) for k, m in found.items() if m}
    instructions = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    report["sass"] = sum(1 for i in instructions if i != "NOP")
    return report


def describe(compiled, cap: int) -> dict:
    ptx = compiled.asm["ptx"]
    return {
        "cubin_bytes": len(compiled.asm["cubin"]),
        "target_ok": f".target sm_{cap}" in ptx,
        "load_vector_bytes": max(
            [int(v) * int(b) // 8 for v, b in re.findall(r"ld\.global[.\w]*?\.v(\d)\.b(\d+)", ptx)]
            or [0]
        ),
        "mulhi": ptx.count("mul.hi.u32"),
        "fma_f32": len(re.findall(r"\bfma\.rn[.\w]*f32", ptx)),
        "lg2": ptx.count("lg2.approx"),
        "math": sorted(set(APPROX.findall(ptx))),
        "calls": sorted(
            set(re.findall(r"^\s*call(?:\.uni)?\s+(?:\([^)]*\),\s*)?(\w+)", ptx, re.M))
        ),
        **resource_usage(compiled.asm["cubin"]),
    }


@triton.jit
def _one_philox_call_per_thread(out_ptr, seed_ptr, FAST_MATH: tl.constexpr):
    g = tl.program_id(0) * 128 + tl.arange(0, 128)
    z0, z1, z2, z3 = common.normal4(tl.load(seed_ptr), g.to(tl.int64), FAST_MATH)
    tl.store(out_ptr + g, z0 + z1 + z2 + z3)


def philox_probe(cap: int) -> dict:
    """PTX of one Philox call + two Box-Muller pairs per thread (128 threads, 128 counters)."""
    fn = _one_philox_call_per_thread
    sig = {"out_ptr": "*fp32", "seed_ptr": "*i64", "FAST_MATH": "constexpr"}
    return describe(compile_fn(fn, sig, {"FAST_MATH": True}, cap, num_warps=4), cap)


def noise_cases(archs):
    for (name, fn), dtype, cap, case in itertools.product(
        NOISE_KERNELS.items(), DTYPES, archs, NOISE_CASES
    ):
        tile, shape, cl, seeded, case_archs = case
        if cap not in case_archs:
            continue
        fmt = torch.channels_last if cl else torch.contiguous_format
        like = torch.empty(shape, dtype=DTYPES[dtype], device="meta", memory_format=fmt)
        args = common.layout_args(like, seeded=seeded)
        args.pop("grid")
        warps = args.pop("num_warps")
        constexprs = {k: v for k, v in args.items() if k.isupper()}
        constexprs["NOISE_FROM_SEED"] = seeded
        if "CLIP_X0" in fn.arg_names:
            constexprs["CLIP_X0"] = False
        guided = "GUIDED" in fn.arg_names
        if guided:
            constexprs["GUIDED"] = False
        scalars = {"guidance": "fp32"} if guided else None
        threads = 32 * warps
        elems = args["ROWS"] * args["W"] * args["NCH"] / threads
        report = {"kernel": name, "dtype": dtype, "sm": cap, "tile": tile, "seeded": seeded,
                  "num_warps": warps, "elems_per_thread": elems}  # fmt: skip
        # Triton's launcher marks n_per 16-divisible only when it is.
        aligned = ("n_per",) if args["n_per"] % 16 == 0 else ()
        yield report, fn, DTYPES[dtype], constexprs, cap, warps, scalars, aligned
        if "CLIP_X0" in fn.arg_names and tile in ("flat4", "nhwc4"):  # DDPM's x0 clipping
            clip = {**constexprs, "CLIP_X0": True}
            yield {**report, "clip_x0": True}, fn, DTYPES[dtype], clip, cap, warps, scalars, aligned
        if guided and tile in ("flat4", "nhwc4"):  # classifier-free guidance's second input
            cfg = {**constexprs, "GUIDED": True}
            yield {**report, "guided": True}, fn, DTYPES[dtype], cfg, cap, warps, scalars, aligned


def step_cases(archs):
    """The STEP_KERNELS variants; every flag the kernel takes and the variant does not set is
    False, and the report names the flags set (lower case)."""
    for (name, (fn, scalars, variants)), dtype, cap in itertools.product(
        STEP_KERNELS.items(), DTYPES, archs
    ):
        for tile, cl, flags in variants:
            seeded = flags.get("NOISE_FROM_SEED", False)
            fmt = torch.channels_last if cl else torch.contiguous_format
            like = torch.empty((64, 3, 256, 256), dtype=DTYPES[dtype], device="meta",
                               memory_format=fmt)  # fmt: skip
            args = common.layout_args(like, seeded=seeded)
            args.pop("grid")
            warps = args.pop("num_warps")
            constexprs = {k: v for k, v in args.items() if k.isupper()}
            constexprs |= {f: False for f in STEP_FLAGS if f in fn.arg_names} | flags
            elems = args["ROWS"] * args["W"] * args["NCH"] / (32 * warps)
            report = {"kernel": name, "dtype": dtype, "sm": cap, "tile": tile, "seeded": seeded,
                      "num_warps": warps, "elems_per_thread": elems,
                      **{k.lower(): True for k in flags}}  # fmt: skip
            aligned = ("n_per",) if args["n_per"] % 16 == 0 else ()
            yield report, fn, DTYPES[dtype], constexprs, cap, warps, scalars, aligned


def main() -> None:
    archs = (90,) if "--quick" in sys.argv else ARCHS
    report = [{"probe": "philox_call", "sm": cap, **philox_probe(cap)} for cap in archs]
    cases = list(noise_cases(archs)) + list(step_cases(archs))
    for name, dtype, cap in itertools.product(group_norm.GROUP_NORM_KERNELS, DTYPES, archs):
        case = group_norm.aot_case(name, DTYPES[dtype])
        if case is not None:
            fn, constexprs, warps, scalars = case
            info = {"kernel": name, "dtype": dtype, "sm": cap, "num_warps": warps}
            cases.append((info, fn, DTYPES[dtype], constexprs, cap, warps, scalars, ("C",)))
    for info, fn, dtype, constexprs, cap, warps, scalars, aligned in cases:
        try:
            sig = signature_of(fn, dtype, constexprs, scalars)
            compiled = compile_fn(fn, sig, constexprs, cap, warps, aligned)
        except Exception as exc:  # reported, and failed, by the test
            info["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        else:
            info.update(describe(compiled, cap))
            if "elems_per_thread" in info and "sass" in info:
                info["sass_per_elem"] = round(info["sass"] / info["elems_per_thread"], 1)
        report.append(info)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
