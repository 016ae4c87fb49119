"""Classifier-free guidance inside the sampling steps: eps = u + s (c - u) formed in the kernel.

The Triton reverse step (interpreter) against the torch reference for every dtype and layout
and s in {0, 1, 3}: the same fp32 operations in the same order, so equal bit for bit
(helpers.EXACT["same_order"]); and against an independent float64 formula written here.
No gradients are taken (the sampler runs under inference_mode).
"""

import itertools
import zlib

import pytest
import torch
from helpers import DEVICE, EXACT, assert_within_ulp, interpreter_rounds_bf16, with_layout

from fastdiff import NoiseSchedule, ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last"]
SHAPE = (2, 4, 4, 4)  # seeded: the FLAT4 and NHWC4 tilings of kernels.common
SCALES = [0.0, 1.0, 3.0]
SCHEDULE = NoiseSchedule.linear(1000).to(DEVICE)


@pytest.fixture(autouse=True)
def _bf16_rounds_to_nearest(monkeypatch):
    interpreter_rounds_bf16(monkeypatch)


def _inputs(shape, dtype, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout)).encode()))
    z, cond, uncond, noise = (
        with_layout(torch.randn(shape, generator=gen).to(DEVICE, dtype), layout) for _ in range(4)
    )
    t = torch.tensor([0, 617], device=DEVICE)[: shape[0]]  # the noise-free last step, and one
    return z, cond, uncond, noise, t


CASES = [(d, lay, s, False) for d, lay, s in itertools.product(DTYPES, LAYOUTS, SCALES)]
CASES += [(torch.float32, lay, 3.0, True) for lay in LAYOUTS]  # with x0 clipping


@pytest.mark.parametrize("dtype,layout,scale,clip_x0", CASES)
def test_guided_reverse_step_kernel_equals_reference(monkeypatch, dtype, layout, scale, clip_x0):
    z, cond, uncond, _, t = _inputs(SHAPE, dtype, layout)

    def step():
        return ops.reverse_step(
            z, cond, t, SCHEDULE, seed=11, clip_x0=clip_x0, pred_uncond=uncond,
            guidance_scale=scale,
        )  # fmt: skip

    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    got = step()
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    want = step()
    assert got.dtype == dtype
    assert got.is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    assert_within_ulp(got, want, dtype, EXACT[dtype]["same_order"])


@pytest.mark.parametrize("scale", SCALES)
def test_guided_reverse_step_matches_float64_formula(monkeypatch, scale):
    """Triton fp32 against Algorithm 20.2 in float64 with eps = u + s (c - u) computed here."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    z, cond, uncond, noise, t = _inputs(SHAPE, torch.float32, "contiguous")
    got = ops.reverse_step(z, cond, t, SCHEDULE, noise, pred_uncond=uncond, guidance_scale=scale)
    betas = torch.tensor(SCHEDULE.config()["betas"], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    b, a = betas[t.cpu()].view(-1, 1, 1, 1), abar[t.cpu()].view(-1, 1, 1, 1)
    eps = uncond.double().cpu() + scale * (cond.double().cpu() - uncond.double().cpu())
    mu = (z.double().cpu() - b / torch.sqrt(1 - a) * eps) / torch.sqrt(1 - b)
    sigma = torch.where(t.cpu() == 0, 0.0, torch.sqrt(betas[t.cpu()])).view(-1, 1, 1, 1)
    want = mu + sigma * noise.double().cpu()
    # fp32: a few roundings of terms of size |z|, |coef * eps| (<= 4 * 4 here).
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=2e-5 * (1 + scale))


@pytest.mark.parametrize("scale", SCALES)
def test_guided_ddim_step_matches_float64_formula(scale):
    z, cond, uncond, _, t = _inputs(SHAPE, torch.float32, "contiguous")
    t = torch.tensor([20, 617], device=DEVICE)
    t_prev = torch.tensor([-1, 500], device=DEVICE)
    got = ops.ddim_step(
        z, cond, t, t_prev, SCHEDULE, seed=0, pred_uncond=uncond, guidance_scale=scale
    )
    abar = torch.cumprod(1 - torch.tensor(SCHEDULE.config()["betas"], dtype=torch.float64), 0)
    a = abar[t.cpu()].view(-1, 1, 1, 1)
    a_prev = torch.tensor([1.0, float(abar[500])], dtype=torch.float64).view(-1, 1, 1, 1)
    eps = uncond.double().cpu() + scale * (cond.double().cpu() - uncond.double().cpu())
    x0 = (z.double().cpu() - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    want = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev) * eps
    # x0 divides by sqrt(a_t) (>= 0.2 here): fp32 error ~1e-6 relative of |eps| / sqrt(a).
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=1e-4 * (1 + scale))


def test_scale_zero_is_the_unconditional_step_exactly(monkeypatch):
    """s = 0: u + 0 (c - u) = u in fp32, so the step equals the unguided one on u, bit for bit."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    z, cond, uncond, noise, t = _inputs(SHAPE, torch.float32, "channels_last")
    got = ops.reverse_step(z, cond, t, SCHEDULE, noise, pred_uncond=uncond, guidance_scale=0.0)
    assert torch.equal(got, ops.reverse_step(z, uncond, t, SCHEDULE, noise))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(pred_uncond=torch.zeros(2, 1, 8, 4)), ValueError, "pred_uncond"),
        (dict(pred_uncond=torch.zeros(2, 1, 8, 8, dtype=torch.int64)), TypeError, "pred_uncond"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
        (dict(guidance_scale=True), TypeError, "guidance_scale"),
        (dict(guidance_scale="3"), TypeError, "guidance_scale"),
    ],
)
def test_bad_guidance_arguments_are_named(kwargs, error, match):
    z = torch.zeros(2, 1, 8, 8)
    t = torch.tensor([3, 4])
    with pytest.raises(error, match=match):
        ops.reverse_step(z, z, t, NoiseSchedule.linear(1000), seed=0, **kwargs)
    with pytest.raises(error, match=match):
        ops.ddim_step(z, z, t, t - 1, NoiseSchedule.linear(1000), seed=0, **kwargs)


@pytest.mark.parametrize("clip_x0", [False, True])
def test_guided_reverse_step_gradients_match_float64_autograd(monkeypatch, clip_x0):
    """The Triton op's backward (d/d pred = s d/d eps, d/d u = (1 - s) d/d eps; clamped x0
    entries carry no x0 gradient) against autograd of the float64 reference formula."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    z, cond, uncond, noise, t = _inputs(SHAPE, torch.float32, "contiguous")
    z, cond, uncond = (v.clone().requires_grad_(True) for v in (z, cond, uncond))
    weights = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = dict(clip_x0=clip_x0, pred_uncond=uncond, guidance_scale=3.0)
    (ops.reverse_step(z, cond, t, SCHEDULE, noise, **kw) * weights).sum().backward()
    got = [v.grad for v in (z, cond, uncond)]
    z64, c64, u64 = (v.detach().double().requires_grad_(True) for v in (z, cond, uncond))
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    kw64 = dict(clip_x0=clip_x0, pred_uncond=u64, guidance_scale=3.0)
    out = ops.reverse_step(z64, c64, t, SCHEDULE.to(DEVICE), noise.double(), **kw64)
    (out * weights.double()).sum().backward()
    for g, want in zip(got, (z64.grad, c64.grad, u64.grad), strict=True):
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-6)
