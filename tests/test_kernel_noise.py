"""Statistics and identities of the in-kernel noise (Triton interpreter on CPU, or CUDA).

eps is read out exactly by running q_sample with x = 0 and a one-step table where
sqrt(alpha) = 0, sqrt(1 - alpha) = 1, so z = eps.  Statistical bounds are 6 standard errors,
so a correct generator fails one with probability ~1e-9.

The promise tested (kernels.common): bit-identical eps for one seed on one backend and device,
in every layout and tile; the interpreter equals the numpy twin bit for bit; compiled CUDA
kernels stay within kernels.reference.noise_bound of it.
"""

import math

import numpy as np
import pytest
import torch
from helpers import DEVICE, with_layout

from fastdiff import NoiseSchedule, ops
from fastdiff.kernels import reference as ref

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastdiff.kernels import common  # noqa: E402
from fastdiff.kernels.q_sample import q_sample_triton  # noqa: E402

SHAPE = (16, 4, 32, 32)  # 65536 elements
N = math.prod(SHAPE)
BOUND = 6.0 / math.sqrt(N)


def kernel_eps(seed, shape=SHAPE, layout="contiguous"):
    x = with_layout(torch.zeros(shape, device=DEVICE), layout)
    t = torch.zeros(shape[0], dtype=torch.long, device=DEVICE)
    ones, zeros = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    return q_sample_triton(x, t, zeros, ones, seed=seed)


def assert_is_twin_noise(got, seed, shape, start=0):
    """The promise: equal to the numpy twin (interpreter), within noise_bound (compiled)."""
    want, radius = ref.philox_normal(seed, shape, start=start, with_radius=True)
    got = got.cpu().reshape(shape)
    if DEVICE.type == "cpu":
        assert torch.equal(got, want)
    else:
        excess = (got - want).abs() - ref.noise_bound(radius)
        assert float(excess.max()) <= 0.0, float(excess.max())


def corr(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def eps():
    return kernel_eps(2024).cpu()


def test_mean_and_variance(eps):
    assert abs(float(eps.mean())) < BOUND
    # Var of the sample variance of N(0,1) is 2/N.
    assert abs(float(eps.var()) - 1.0) < 6.0 * math.sqrt(2.0 / N)


def test_gaussian_shape(eps):
    """Mass within 1 and 2 sigma, and the 4th moment, match the standard normal."""
    for k, p in [(1.0, 0.682689492), (2.0, 0.954499736)]:
        frac = float((eps.abs() < k).double().mean())
        assert abs(frac - p) < 6.0 * math.sqrt(p * (1 - p) / N)
    kurt = float(eps.double().pow(4).mean())
    assert abs(kurt - 3.0) < 6.0 * math.sqrt(96.0 / N)  # Var(x^4) = 105 - 9 = 96


def test_no_correlation_between_neighbours(eps):
    assert abs(corr(eps[..., 1:], eps[..., :-1])) < BOUND  # along w
    assert abs(corr(eps[:, :, 1:], eps[:, :, :-1])) < BOUND  # along h
    assert abs(corr(eps[:, 1:], eps[:, :-1])) < BOUND  # along c
    assert abs(corr(eps[1:], eps[:-1])) < BOUND  # across samples


def test_the_four_outputs_of_one_call_are_independent(eps):
    """Lanes 0..3 of a Philox call: uncorrelated, and so are their squares (lanes 0 and 1
    share a Box-Muller radius, so a broken transform would show in the squares)."""
    lanes = eps.reshape(-1, 4)
    bound = 6.0 / math.sqrt(lanes.shape[0])
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(corr(lanes[:, i], lanes[:, j])) < bound, (i, j)
            assert abs(corr(lanes[:, i] ** 2, lanes[:, j] ** 2)) < bound, (i, j)


def test_seeds_are_independent_and_reproducible(eps):
    assert torch.equal(kernel_eps(2024).cpu(), eps)
    for other in (2025, 2024 + 2**32, 0):  # 2024 + 2**32 differs in the key's high word only
        assert abs(corr(kernel_eps(other).cpu(), eps)) < BOUND


#: (shape, the tiles contiguous / channels_last take): all four tile layouts.
LAYOUT_SHAPES = [
    ((2, 3, 8, 6), ("FLAT4", "NHWC4")),  # H*W = 48
    ((2, 6, 2, 2), ("FLAT4", "NHWC4")),  # NHWC4 with 6 channels (rows of 24)
    ((3, 5, 7, 3), ("GENERIC_NCHW", "GENERIC_NHWC")),  # n_per = 105, H*W = 21
    ((2, 4, 3, 5), ("FLAT4", "GENERIC_NHWC")),  # n_per % 4 == 0 but H*W = 15
    ((2, 9, 4, 4), ("FLAT4", "GENERIC_NHWC")),  # more channels than NHWC4 takes
]


@pytest.mark.parametrize("shape,tiles", LAYOUT_SHAPES, ids=[str(s) for s, _ in LAYOUT_SHAPES])
def test_layout_independent_and_twin_noise(shape, tiles):
    """contiguous and channels_last tensors get the same eps per logical element, whichever
    tile each takes, and that eps is the twin's."""
    for layout, tile in zip(("contiguous", "channels_last"), tiles, strict=True):
        x = with_layout(torch.zeros(shape), layout)
        assert common.layout_args(x)["LAYOUT"] == getattr(common, tile), (layout, tile)
    a = kernel_eps(9, shape, "contiguous")
    b = kernel_eps(9, shape, "channels_last")
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
    assert_is_twin_noise(a, 9, shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_tiles_draw_the_same_noise(dtype):
    """16-bit tensors use rows of 8 (two Philox calls per row): the same eps, rounded to the
    dtype (the interpreter may truncate instead of rounding: one step of the dtype)."""
    shape = (2, 4, 4, 4)
    x = torch.zeros(shape, device=DEVICE, dtype=dtype)
    t = torch.zeros(2, dtype=torch.long, device=DEVICE)
    z = q_sample_triton(x, t, torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE), seed=4)
    assert common.layout_args(x)["W"] == 8
    step = torch.finfo(dtype).eps
    torch.testing.assert_close(z.float(), kernel_eps(4, shape), rtol=step, atol=0)


@triton.jit
def draw(out_ptr, seed_ptr, base, C, HW, ROWS: tl.constexpr, W: tl.constexpr,
         NCH: tl.constexpr, LAYOUT: tl.constexpr, FAST_MATH: tl.constexpr):  # fmt: skip
    """eps of a one-tile "sample" whose memory starts at the logical index ``base``."""
    seed = tl.load(seed_ptr)
    for s in tl.static_range(NCH):
        row = tl.arange(0, ROWS)[:, None]
        i = tl.arange(0, W)[None, :]
        offs = row * (4 * NCH) + 4 * s + i if LAYOUT == 3 else row * W + i
        eps = common.chunk_noise(seed, base, offs, C, HW, 1, s, ROWS, W, NCH, LAYOUT, FAST_MATH)
        tl.store(out_ptr + offs, eps)


COUNTER_CASES = [
    (layout, start)
    for layout in ("FLAT4", "NHWC4", "GENERIC_NCHW")
    for start in (2**32 + 8, 2**40 + 2**32 + 4)
] + [("GENERIC_NCHW", 2**32 + 5)]  # FLAT4/NHWC4 samples start at multiples of 4


@pytest.mark.parametrize("layout,start", COUNTER_CASES)
def test_counter_above_2_pow_32(layout, start):
    """Logical indices past 2^32 put g >> 32 in the counter's second word (so they do not wrap
    onto small indices), in every tile layout."""
    C, HW = (3, 16) if layout == "NHWC4" else (1, 64)
    rows = HW // 4  # one row per quad (NHWC4) or per 4 elements (W = 4)
    out = torch.empty(C * HW, device=DEVICE)
    seed = torch.tensor([7], device=DEVICE)
    draw[(1,)](out, seed, start, C, HW, rows, 4, C if layout == "NHWC4" else 1,
               getattr(common, layout), not common.interpreting())  # fmt: skip
    if layout == "NHWC4":  # memory (pixel, channel) -> logical (channel, pixel)
        out = out.reshape(HW, C).t().contiguous()
    assert_is_twin_noise(out, 7, (C, HW), start=start)
    low = ref.philox_normal(7, (C * HW,), start=start % 2**32)
    assert not torch.allclose(out.cpu().flatten(), low, atol=1e-3)


def test_philox_twin_is_philox4x32_10():
    """Known-answer vectors of Random123's philox4x32_10 (kat_vectors)."""

    def run(ctr, key):
        words = ref.philox4x32_10(*(np.array([c], dtype=np.uint64) for c in ctr), key)
        return [int(w[0]) for w in words]

    assert run((0, 0, 0, 0), 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF) == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD,
    ]  # fmt: skip
    pi = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert run(pi, 0x299F31D0A4093822) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_noise_bound_covers_the_documented_worst_cases():
    """Emulate the compiled noise with every approximation pushed to its documented worst case
    (in both directions) against an exact float64 transform of the same words: the deviation
    stays within noise_bound, for radii from the tail (U = 2^-33) down to U -> 1."""
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(0, 2**32, 20000), [0, 1, 2**31, 2**32 - 2**9, 2**32 - 1]])
    b = rng.integers(0, 2**32, a.size).astype(np.uint64)
    a = a.astype(np.uint64)
    _, _, r_twin = ref.box_muller(a, b)
    u = a.astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33)
    v = ((b >> np.uint64(9)) | np.uint64(0x3F800000)).astype(np.uint32).view(np.float32) - 1.5
    theta = np.float32(2 * np.pi) * v
    log2u = np.log2(u.astype(np.float64))
    exact = np.sqrt(-2 * np.log(u.astype(np.float64))) * np.cos(theta.astype(np.float64))
    for sign in (-1.0, 1.0):
        lg2 = log2u + sign * 2.0**-22 * np.maximum(1.0, np.abs(log2u))
        r2 = np.maximum(lg2 * ref._NEG_2_LN2 * (1 + sign * 2.0**-24), 0.0)
        r = np.sqrt(r2) * (1 + sign * 2.0**-22)
        cos = np.cos(theta.astype(np.float64)) + sign * 2.0**-21.19
        emulated = r * cos * (1 + sign * 2.0**-24)
        excess = np.abs(emulated - exact) - ref.noise_bound(torch.from_numpy(r_twin)).numpy()
        assert excess.max() <= 0.0, excess.max()
    # The twin itself (numpy float32) is well within its share.
    twin = ref.box_muller(a, b)[0].astype(np.float64)
    assert np.max(np.abs(twin - exact) / np.maximum(r_twin, 1e-3)) < 1e-6


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_q_sample_and_noise_loss_share_eps(triton_backend, layout):
    """noise_loss(seed=s) regenerates exactly the eps that q_sample(seed=s) used."""
    schedule = NoiseSchedule.linear(1000).to(DEVICE)
    x = with_layout(torch.rand(4, 3, 8, 7, device=DEVICE) * 2 - 1, layout)
    t = torch.tensor([0, 10, 500, 999], device=DEVICE)
    z = ops.q_sample(x, t, schedule, seed=42)
    a = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    b = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = ((z.double() - a * x.double()) / b).float()
    per_sample = ops.noise_loss(eps, t, seed=42, reduction="none")
    assert float(per_sample.max()) < 1e-6  # ~0: t=0 amplifies fp32 rounding by 1/b = 100
    assert float(ops.noise_loss(eps, t, seed=43)) > 1.0  # another seed: another eps
    # pred = 0 gives mean(eps^2), the same value as the explicit-noise loss.
    zero = torch.zeros_like(eps)
    torch.testing.assert_close(
        ops.noise_loss(zero, t, seed=42), eps.square().mean(), rtol=1e-4, atol=0
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_sample_beyond_int32_offsets_is_refused_before_launch(layout):
    """Offsets within one sample are int32 in the kernels: a sample whose elements (plus one
    tile) pass 2**31 - 1 is refused with an error naming x; the largest that fits is not.
    Meta tensors: nothing is allocated."""
    big = with_layout(torch.empty((1, 3, 26800, 26800), device="meta"), layout)  # 2.15e9
    with pytest.raises(ValueError, match=r"^x: 2154720000 elements per sample"):
        common.layout_args(big)
    fits = with_layout(torch.empty((2, 3, 26000, 26000), device="meta"), layout)  # 2.03e9
    assert common.layout_args(fits)["n_per"] == 3 * 26000 * 26000
