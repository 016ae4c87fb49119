"""Small helpers shared by the tests (imported as ``from helpers import ...``)."""

import os

import numpy
import pytest
import torch
import torch.nn.functional as F

#: Where the kernel tests run: compiled kernels on CUDA tensors when a GPU is present, else the
#: Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET then).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_interpreter() -> None:
    """Skip a test that runs the Triton kernels on CPU tensors (or the CPU emulation of CUDA
    graphs) where the interpreter is off: in a CUDA run tests/conftest.py leaves
    TRITON_INTERPRET unset, and fastdiff.ops refuses Triton on CPU tensors without it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1): off here")


#: Relative/absolute tolerance of a Triton result against the torch reference, per dtype.
#: fp32: both compute the same fp32 formula (FMA contraction may differ: ~1 ulp).  bf16/fp16:
#: both round the same fp32 value to the output dtype; a 1-ulp flip of the rounding is allowed.
TOLERANCE = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=2**-7),
    torch.float16: dict(rtol=2**-10, atol=2**-10),
}

#: Shapes with odd sizes and batches 1..9, small enough for the Triton interpreter.
SHAPES = [(1, 3, 17, 13), (2, 1, 5, 7), (5, 4, 3, 3), (9, 2, 6, 5)]


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x in memory layout "contiguous" or "channels_last" (same logical values)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def is_layout(x: torch.Tensor, layout: str) -> bool:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.is_contiguous(memory_format=fmt)


# -- exactness of 16-bit results (tests/test_exact_16bit.py) ---------------------------------

#: fp32 unit roundoff: one fp32 operation errs by at most U * |result|.
U = 2.0**-24

#: True where the kernel tests run compiled kernels (CUDA) rather than the interpreter.
COMPILED = DEVICE.type == "cuda"

#: How close kernel results must be to their references, per dtype, in one place: distances
#: in ulps of the result's own dtype, as ``assert_within_ulp`` counts them, after the
#: reference is widened by the ``slack`` each test derives (fp32 error bounds; on CUDA also
#: ``fma_slack`` and the fast-math noise bound).  Equal, for every dtype:
#:
#: same_order  vs the fp32 formula written in the kernel's own operation order, from the same
#:             inputs, rounded to the dtype: equal, bit for bit (no slack in the interpreter,
#:             which performs exactly those fp32 operations with numpy).
#: float64     vs float64 formulas / autograd on the upcast inputs (independent code, other
#:             operation order), widened by the op's fp32 error bound (k roundings of the
#:             magnitudes involved, k counted per op in the tests): equal.  So a result may be
#:             1 ulp from the rounded float64 value only where that value lies within fp32
#:             error of a rounding tie (the kernels round twice: fp32 arithmetic, then the
#:             store); anything else -- a 2^-8 relative error in bf16 included -- fails.
#: fp32_op     a 16-bit op vs the same op run in fp32 on the upcast inputs, rounded: equal (the
#:             16-bit path may add nothing but its final rounding).  Compiled, reductions
#:             (GroupNorm) may sum in another order for 16-bit loads: their fp32 error bound
#:             is the slack there.
EXACT = {
    torch.bfloat16: dict(same_order=0, float64=0, fp32_op=0),
    torch.float16: dict(same_order=0, float64=0, fp32_op=0),
    torch.float32: dict(same_order=0, float64=0, fp32_op=0),
}


def fma_slack(*products):
    """How far compiled code may move an fp32 sum of ``products`` (tensors of a * b values):
    LLVM may contract a * b + c into one FMA (TRITON_DEFAULT_FP_FUSION=1), skipping the
    product's rounding, at most U |a b| each.  0 in the interpreter (no contraction)."""
    if not COMPILED:
        return 0.0
    return U * sum(p.double().abs() for p in products)


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}  # fmt: skip


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (any float dtype) correctly rounded (to nearest, ties to even) to ``dtype``.

    torch converts float64 to bf16/fp16 through float32, a double rounding that can misround
    values near a 16-bit tie.  Here float64 -> float32 rounds to odd (truncate, then set the
    last bit if anything was cut), which keeps enough information for the final
    round-to-nearest-even to be exact (float32 carries >= 2 more bits than either 16-bit type,
    subnormals included).
    """
    x = x.double()
    if dtype == torch.float64:
        return x
    f = x.float()
    if dtype == torch.float32:
        return f
    away = f.double().abs() > x.abs()  # rounded away from zero: step back towards zero
    f = torch.where(away & torch.isfinite(x), torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = (f.double() != x) & torch.isfinite(x)
    f = torch.where(inexact, (f.view(torch.int32) | 1).view(torch.float32), f)
    return f.to(dtype)


def _ordinal(x: torch.Tensor) -> torch.Tensor:
    """Each value's position on the number line of its dtype (int64): adjacent representable
    values differ by 1, +0 and -0 are both 0, subnormals and infinities included."""
    bits = x.view(_BITS[x.dtype]).long()
    width = torch.finfo(x.dtype).bits
    magnitude = bits & ((1 << (width - 1)) - 1)
    negative = ((bits >> (width - 1)) & 1).bool()
    return torch.where(negative, -magnitude, magnitude)


def ulp_distance(actual, expected, dtype=None, slack=0.0) -> torch.Tensor:
    """Per element: how many representable values of ``dtype`` lie between ``actual`` and the
    correctly rounded ``expected`` (int64; 0 = equal).

    ``expected`` is a higher-precision reference (fp32/fp64, unrounded).  ``slack`` (float or
    tensor, absolute) widens it to the interval [expected - slack, expected + slack]: any
    value in it rounds to an acceptable result (distance 0).  NaN against non-NaN is 2^62.
    """
    dtype = dtype or actual.dtype
    a = actual.to(dtype) if actual.dtype != dtype else actual
    e = expected.double()
    lo, hi = _ordinal(round_to(e - slack, dtype)), _ordinal(round_to(e + slack, dtype))
    o = _ordinal(a.contiguous())
    d = torch.clamp(torch.maximum(lo - o, o - hi), min=0)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    d = torch.where(nan_a & nan_e, 0, d)
    return torch.where(nan_a ^ nan_e, 2**62, d)


def assert_within_ulp(actual, expected, dtype=None, ulps=1, *, slack=0.0, what="result"):
    """Assert every element of ``actual`` is within ``ulps`` units in the last place of
    ``dtype`` (default: actual's) of ``expected`` correctly rounded to that dtype.

    ``expected``: the fp32 or fp64 reference, *not* rounded (rounding it is part of the
    check); ``slack`` as in ``ulp_distance``.  Signs, +-0, subnormals and infinities are
    handled by counting representable values (``_ordinal``).  The failure message names how
    many elements fail, the largest distance and where it is.
    """
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, (what, tuple(actual.shape), tuple(expected.shape))
    dist = ulp_distance(actual, expected, dtype, slack)
    bad = dist > ulps
    if not bool(bad.any()):
        return
    worst = int(dist.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), dist.shape))
    e = expected.double().reshape(-1)[worst]
    s = slack.reshape(-1)[worst] if isinstance(slack, torch.Tensor) else slack
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {dist.numel()} elements more than {ulps} ulp of {dtype}"
        f" from the reference; max distance {int(dist.max())} ulp at index {idx}: got"
        f" {float(actual.reshape(-1)[worst])!r}, reference {float(e)!r} (rounds to"
        f" {float(round_to(e, dtype))!r}, slack {float(s):.3g})"
    )


def interpreter_rounds_bf16(monkeypatch) -> None:
    """Make the Triton interpreter round fp32 -> bf16 to nearest even, as GPUs do.

    Interpreter gap (triton 3.x ``InterpreterBuilder.cast_impl``): ``x.to(tl.bfloat16)`` and
    bf16 stores of fp32 values go through ``_convert_float(..., rounding_mode=None)``, which
    *truncates* the mantissa; compiled kernels round to nearest even (``cvt.rn.bf16.f32``).
    Unpatched, about half of all bf16 outputs sit one ulp below the correct rounding, which
    the exact tests would report as kernel errors.  fp16 (numpy ``astype``) rounds correctly.
    No-op without the interpreter (compiled kernels need no help).
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - the kernel tests skip without triton
        return
    import numpy as np
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)


# -- a stand-in for the FID network (tests/test_metrics.py, tests/test_fid_training.py) -----


#: Features of FakeInception (the real network has 2048).
FAKE_INCEPTION_DIM = 8


class FakeInception(torch.nn.Module):
    """Interface of inception-2015-12-05.pt: uint8 (N, 3, H, W) -> bilinear 8x8, (x - 128)
    / 128, conv, pool, linear -> (N, FAKE_INCEPTION_DIM) with return_features=True."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1234)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6 * 4 * 4, FAKE_INCEPTION_DIM)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x.to(torch.float32), size=(8, 8), mode="bilinear", align_corners=False)
        h = F.avg_pool2d(torch.tanh(self.conv((x - 128) / 128)), 2)
        features = torch.tanh(self.fc(h.flatten(1)))
        return features if return_features else features.sum(1)


def save_fake_inception(path):
    """Script FakeInception and save it where inception-2015-12-05.pt would be read from."""
    torch.jit.script(FakeInception()).save(str(path))
    return path


def own_features(net_file, images):
    """Features computed here: PNG quantisation, gray -> 3 channels, the scripted network."""
    u8 = ((torch.as_tensor(images).double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        f = torch.jit.load(str(net_file))(u8.repeat(1, 3 // u8.shape[1], 1, 1), True)
    return f.double().numpy()


def scipy_fid(fa, fb) -> float:
    """StyleGAN2-ADA's formula: scipy sqrtm of S1 S2, real part of the trace expression."""
    import scipy.linalg

    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = numpy.cov(fa, rowvar=False), numpy.cov(fb, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb)
    return float(numpy.real(((mu_a - mu_b) ** 2).sum() + numpy.trace(sa + sb - 2 * root)))


def write_npz(path, n: int = 8):
    """A tiny .npz data set at ``path``: n random uint8 images (n, 1, 8, 8) under ``images``."""
    rng = numpy.random.default_rng(0)
    numpy.savez(path, images=rng.integers(0, 256, (n, 1, 8, 8), dtype=numpy.uint8))
    return path
