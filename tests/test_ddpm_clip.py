"""DDPM's optional x0 clipping (improved-diffusion's ``clip_denoised``): the formula, the fused
kernel's CLIP_X0 path against the reference, its gradient, and the sampler."""

import itertools
import zlib

import pytest
import torch
from helpers import DEVICE, TOLERANCE, is_layout, with_layout
from test_ddim import ShrunkGaussianDenoiser

from fastdiff import Diffusion, NoiseSchedule, ops
from fastdiff.precision import resolve_precision
from fastdiff.sampling import Sampler, StepBuffers, initial_noise

S = NoiseSchedule.linear(1000)
SCHEDULE = S.to(DEVICE)


def test_clipped_step_is_the_posterior_mean_at_the_clamped_x0():
    gen = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(6, 1, 3, 3, dtype=torch.float64, generator=gen)
    pred, noise = torch.randn(2, 6, 1, 3, 3, dtype=torch.float64, generator=gen)
    t = torch.tensor([999, 500, 100, 10, 1, 0])
    view = (-1, 1, 1, 1)
    a = S.alphas_cumprod[t].view(view)
    x0 = ((z - torch.sqrt(1 - a) * pred) / torch.sqrt(a)).clamp(-1, 1)
    mu = S.posterior_mean_coef_x0[t].view(view) * x0 + S.posterior_mean_coef_z[t].view(view) * z
    for variance, sigma in [("beta", S.sigma_beta), ("posterior", S.sigma_posterior)]:
        sig = torch.where(t == 0, 0.0, sigma[t]).view(view)
        got = ops.reverse_step(z, pred, t, S, noise, variance=variance, clip_x0=True)
        torch.testing.assert_close(got, mu + sig * noise, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[-1], x0[-1], rtol=0, atol=1e-12)  # last step: clamped x0
    # Where x0 is inside [-1, 1] the clipped step is Algorithm 20.2's formula, bit for bit.
    pred_inside = (z - torch.sqrt(a) * 0.5) / torch.sqrt(1 - a)  # x0 = 0.5 (up to rounding)
    plain = ops.reverse_step(z, pred_inside, t, S, noise)
    assert torch.equal(ops.reverse_step(z, pred_inside, t, S, noise, clip_x0=True), plain)


def _inputs(shape, dtype, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout)).encode()))
    z, pred, noise = (
        with_layout((2 * torch.randn(shape, generator=gen)).to(DEVICE, dtype), layout)
        for _ in range(3)
    )
    t = torch.randint(0, SCHEDULE.T, (shape[0],), generator=gen)
    t[0], t[-1] = 0, 3  # the noise-free last step, and a low-noise step where x0 ~ z
    return z, pred, noise, t.to(DEVICE)


@pytest.mark.parametrize(
    "shape,dtype,layout",
    list(
        itertools.product(
            [(1, 3, 17, 13), (5, 4, 3, 3)],
            [torch.float32, torch.bfloat16, torch.float16],
            ["contiguous", "channels_last"],
        )
    ),
)
def test_kernel_clip_path_matches_reference(monkeypatch, triton_backend, shape, dtype, layout):
    z, pred, noise, t = _inputs(shape, dtype, layout)

    def both(fn):
        monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
        got = fn()
        monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
        return got, fn()

    got, want = both(lambda: ops.reverse_step(z, pred, t, SCHEDULE, noise, clip_x0=True))
    assert got.dtype == dtype and is_layout(got, layout)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    unclipped = ops.reverse_step(z, pred, t, SCHEDULE, noise)
    assert not torch.allclose(want, unclipped)  # clipping is active in these inputs
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TOLERANCE[dtype]
    got, want = both(
        lambda: ops.reverse_step(z, pred, t, SCHEDULE, seed=7, variance="posterior", clip_x0=True)
    )
    torch.testing.assert_close(got, want, **tol)


def test_kernel_clip_gradient_matches_reference_autograd(monkeypatch, triton_backend):
    z, pred, noise, t = _inputs((3, 2, 4, 4), torch.float32, "contiguous")
    grads = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
        zz, pp = z.clone().requires_grad_(), pred.clone().requires_grad_()
        out = ops.reverse_step(zz, pp, t, SCHEDULE, noise, clip_x0=True)
        (out * noise).sum().backward()  # any fixed upstream gradient
        grads[backend] = (zz.grad, pp.grad)
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_clipped_ddpm_sampling_through_the_kernel_matches_reference(monkeypatch, triton_backend):
    schedule = NoiseSchedule.linear(20)
    model = ShrunkGaussianDenoiser(schedule, 0.3, 0.3, k=0.9)
    d = Diffusion(model, schedule, (1, 4, 4), config={"precision": "fp32"}).to(DEVICE)
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    want = d.sample(3, seed=1, clip_x0=True)
    assert not torch.equal(want, d.sample(3, seed=1))
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    torch.testing.assert_close(d.sample(3, seed=1, clip_x0=True), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(clip_x0=True),
        dict(sampler="ddim", steps=20, clip_x0=True),
        dict(sampler="ddim", steps=20, clip_x0=True, clip_rule="diffusers"),
        dict(sampler="dpm++2m", steps=20, clip_x0=True),  # fused step, counter, x0 history
    ],
)
def test_clipped_samplers_replay_without_host_syncs(kwargs):
    """Clipped DDPM (fused kernel) and clipped DDIM with eta = 0 are captured as CUDA graphs
    (a sync inside the step would fail the capture), replay with no host synchronisation
    (sync debug mode "error"), and equal the eager loop."""
    dev = torch.device("cuda")
    schedule = NoiseSchedule.linear(100).to(dev)
    model = ShrunkGaussianDenoiser(schedule, 0.3, 0.3, k=0.95).to(dev)
    sampler = Sampler(
        model, schedule, precision=resolve_precision("fp32", dev), channels_last=False, **kwargs
    )
    assert sampler.capturable
    with torch.inference_mode():
        z0 = initial_noise((8, 1, 4, 4), dev, 3, 0, False)
        eager = sampler.run_eager(StepBuffers(z0.clone(), sampler.timesteps[0], 5)).clone()
        sampler.run_graph(z0, 5, strict=True)  # captures the step (strict: no eager fallback)
        assert not sampler.graph_failed and 8 in sampler._graphs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph = sampler.run_graph(z0, 5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
