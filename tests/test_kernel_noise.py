"""Statistics and identities of the in-kernel noise (Triton interpreter on CPU).

eps is read out exactly by running q_sample with x = 0 and a one-step table where
sqrt(alpha) = 0, sqrt(1 - alpha) = 1, so z = eps.  Bounds are 6 standard errors, so a
correct generator fails them with probability ~1e-9 per check.
"""

import math

import pytest
import torch
from helpers import DEVICE, with_layout

from fastdiff import NoiseSchedule, ops
from fastdiff.kernels.reference import philox_normal

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastdiff.kernels.common import standard_normal  # noqa: E402
from fastdiff.kernels.q_sample import q_sample_triton  # noqa: E402

SHAPE = (16, 4, 32, 32)  # 65536 elements
N = math.prod(SHAPE)
BOUND = 6.0 / math.sqrt(N)


def kernel_eps(seed, shape=SHAPE, layout="contiguous"):
    x = with_layout(torch.zeros(shape, device=DEVICE), layout)
    t = torch.zeros(shape[0], dtype=torch.long, device=DEVICE)
    ones, zeros = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    return q_sample_triton(x, t, zeros, ones, seed=seed)


def corr(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def eps():
    return kernel_eps(2024)


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


def test_seeds_are_independent_and_reproducible(eps):
    assert torch.equal(kernel_eps(2024), eps)
    for other in (2025, 2024 + 2**32, 0):
        assert abs(corr(kernel_eps(other), eps)) < BOUND


def test_layout_independent():
    """channels_last and contiguous tensors get the same eps per logical element."""
    shape = (3, 5, 7, 6)
    a = kernel_eps(9, shape, "contiguous")
    b = kernel_eps(9, shape, "channels_last")
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def test_kernel_noise_is_reference_philox():
    torch.testing.assert_close(
        kernel_eps(31, (2, 3, 5, 4)), philox_normal(31, (2, 3, 5, 4)), rtol=1e-5, atol=1e-5
    )


@triton.jit
def draw(out_ptr, seed_ptr, base, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(out_ptr + r, standard_normal(seed_ptr, base, r, 1, 1, False))


def test_counter_above_2_pow_32():
    """Element indices past 2^32 use the high counter word, as Triton's randn does."""
    start = 2**32 + 5
    out = torch.empty(64, device=DEVICE)
    draw[(1,)](out, torch.tensor([7], device=DEVICE), start, BLOCK=64)
    out = out.cpu()
    torch.testing.assert_close(out, philox_normal(7, (64,), start=start), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, philox_normal(7, (64,), start=5))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_q_sample_and_noise_loss_share_eps(triton_backend, layout):
    """noise_loss(seed=s) regenerates exactly the eps that q_sample(seed=s) used."""
    schedule = NoiseSchedule.linear(1000).to(DEVICE)
    x = with_layout(torch.rand(4, 3, 9, 7, device=DEVICE) * 2 - 1, layout)
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
