"""Lower every fastdiff kernel to Triton IR as a GPU launch would specialise it; JSON report.

Run as a script, in a process where TRITON_INTERPRET is unset (``tests/test_kernels_compile.py``
runs it once).  Only Triton's front end runs (source to TTIR, no PTX), so each case takes a
fraction of a second.  Two things a real launch does that tests/aot_compile.py (every scalar an
i32) and the interpreter (every scalar a tensor) never show:

1. ``specialised_to_1``: Triton's launcher turns an int argument equal to 1 into a constexpr
   (``native_specialize_impl``), so a kernel must lower with any of its int arguments, and all
   of them at once, as the constant 1 (e.g. GroupNorm with H = W = 1 and one channel per group).
2. ``debug_overflow_asserts``: with ``debug=True`` (TRITON_DEBUG=1) Triton checks every 32-bit
   integer add and mul for overflow; Philox wraps around by design, so one Philox call must
   lower with no such assert (a probe kernel with no other integer arithmetic).
"""

import json
import os
import re
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import aot_compile  # noqa: E402

from fastdiff.kernels import common, group_norm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
OVERFLOW = re.compile(r"overflow detected")


def ttir(fn, signature: dict, constexprs: dict, **options) -> str:
    """The TTIR text of fn (Triton's compile() up to its first stage)."""
    backend = make_backend(TARGET)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    opts = backend.parse_options(dict(options, **src.parse_options()))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(
        TARGET, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context
    )
    return str(module)


def kernel_cases():
    """One fp32 case per kernel of aot_compile (its first variant), and each GroupNorm kernel."""
    seen = {}
    for info, fn, dtype, constexprs, _cap, warps, scalars, _ in list(
        aot_compile.noise_cases((90,))
    ) + list(aot_compile.step_cases((90,))):
        if info["dtype"] == "fp32" and info["kernel"] not in seen:
            seen[info["kernel"]] = (fn, dtype, constexprs, warps, scalars)
    for name in group_norm.GROUP_NORM_KERNELS:
        case = group_norm.aot_case(name, aot_compile.DTYPES["fp32"])
        if case is not None:
            fn, constexprs, warps, scalars = case
            seen[name] = (fn, aot_compile.DTYPES["fp32"], constexprs, warps, scalars)
    return seen


def specialised_to_1() -> list[dict]:
    rows = []
    for name, (fn, dtype, constexprs, warps, scalars) in kernel_cases().items():
        sig = aot_compile.signature_of(fn, dtype, constexprs, scalars)
        ints = [a for a, s in sig.items() if s == "i32"]
        for ones in [[a] for a in ints] + ([ints] if len(ints) > 1 else []):
            row = {"kernel": name, "ones": ones}
            spec_sig = {**sig, **{a: "constexpr" for a in ones}}
            spec = {**constexprs, **{a: 1 for a in ones}}
            try:
                ttir(fn, spec_sig, spec, num_warps=warps)
            except Exception as exc:  # reported, and failed, by the test
                row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            rows.append(row)
    return rows


@triton.jit
def _philox_only(out_ptr, c_ptr, seed_ptr):
    offs = tl.arange(0, 128)  # no integer arithmetic outside philox4x32_10
    c = tl.load(c_ptr + offs)
    r0, r1, r2, r3 = common.philox4x32_10(tl.load(seed_ptr), c, c)
    tl.store(out_ptr + offs, r0 ^ r1 ^ r2 ^ r3)


def debug_overflow_asserts() -> dict:
    sig = {"out_ptr": "*u32", "c_ptr": "*u32", "seed_ptr": "*i64"}
    text = ttir(_philox_only, sig, {}, num_warps=4, debug=True)
    return {"overflow_asserts": len(OVERFLOW.findall(text)), "asserts": text.count("tt.assert")}


def main() -> None:
    report = {"specialised_to_1": specialised_to_1(), "philox_debug": debug_overflow_asserts()}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
