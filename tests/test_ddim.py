"""DDIM (Song et al. 2021): its algebra against DDPM, and the analytic Gaussian case."""

import math

import pytest
import torch
from test_sampling import gaussian_diffusion

from fastdiff import NoiseSchedule, ops
from fastdiff.sampling import sampling_timesteps

S = NoiseSchedule.linear(1000)


def test_true_noise_stays_on_the_forward_trajectory():
    """eta = 0, pred = the true eps: z_prev = sqrt(a_prev) x + sqrt(1 - a_prev) eps exactly."""
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    eps = torch.randn_like(x)
    t = torch.tensor([999, 500, 10, 3, 1, 0])
    t_prev = torch.tensor([900, 250, 9, 0, -1, -1])
    z = ops.q_sample(x, t, S, eps)
    got = ops.ddim_step(z, eps, t, t_prev, S, seed=0)
    a_prev = torch.where(t_prev >= 0, S.alphas_cumprod[t_prev.clamp(min=0)], torch.ones(6))
    a_prev = a_prev.view(-1, 1, 1, 1)
    want = torch.sqrt(a_prev) * x + torch.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_eta_one_single_steps_are_ddpm_with_posterior_variance():
    z = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    pred, noise = torch.randn_like(z), torch.randn_like(z)
    t = torch.tensor([999, 700, 300, 5, 1])
    ddim = ops.ddim_step(z, pred, t, t - 1, S, noise, eta=1.0)
    ddpm = ops.reverse_step(z, pred, t, S, noise, variance="posterior")
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_timesteps():
    assert sampling_timesteps(1000, "ddim", 5) == [999, 749, 500, 250, 0]
    assert sampling_timesteps(10, "ddim", 50) == list(range(9, -1, -1))
    assert sampling_timesteps(4, "ddpm", None) == [3, 2, 1, 0]


def ddim_gaussian_prediction(schedule, mean, std, steps):
    """Mean and std of deterministic DDIM samples for data N(mean, std^2), in closed form.

    With the optimal eps-predictor, one DDIM step maps d = z_t - sqrt(a_t) mean linearly:
        d' = d (sqrt(a' a_t) v + sqrt((1 - a')(1 - a_t))) / (a_t v + 1 - a_t),   v = std^2,
    a factor below the ideal sigma'/sigma_t (Cauchy-Schwarz), so few steps shrink the spread.
    Starting from z_T ~ N(0, 1): d_T has mean -sqrt(a_T) mean and std 1.
    """
    ac = schedule.alphas_cumprod.tolist()
    v, gain = std**2, 1.0
    ts = sampling_timesteps(schedule.T, "ddim", steps)
    for t, t_prev in zip(ts, ts[1:] + [-1], strict=True):
        a, a_prev = ac[t], (ac[t_prev] if t_prev >= 0 else 1.0)
        gain *= (math.sqrt(a_prev * a) * v + math.sqrt((1 - a_prev) * (1 - a))) / (a * v + 1 - a)
    return mean - math.sqrt(ac[-1]) * mean * gain, gain


@pytest.mark.parametrize("steps", [20, 50, 1000])
def test_gaussian_samples_match_the_closed_form(steps):
    """DDIM with the optimal denoiser: sample mean/std equal the closed-form prediction, and
    approach the data's (mean, std) as the number of steps grows."""
    mean, std, n = -0.2, 0.3, 1024
    d = gaussian_diffusion(mean, std)
    x = d.sample(n, seed=0, sampler="ddim", steps=steps, clip_x0=False).double().flatten()
    want_mean, want_std = ddim_gaussian_prediction(d.schedule, mean, std, steps)
    N = x.numel()
    assert abs(float(x.mean()) - want_mean) < 6 * want_std / math.sqrt(N)
    assert abs(float(x.std()) / want_std - 1) < 6 / math.sqrt(2 * N)
    if steps == 1000:
        assert want_std == pytest.approx(std, rel=0.01)


def test_ddim_sampling_is_deterministic_and_eta_adds_noise():
    d = gaussian_diffusion(0.0, 0.5, T=100)
    a = d.sample(4, seed=1, sampler="ddim", steps=10)
    assert a.shape == (4, 1, 4, 4)
    assert torch.equal(a, d.sample(4, seed=1, sampler="ddim", steps=10))
    noisy = d.sample(4, seed=1, sampler="ddim", steps=10, eta=1.0)
    assert not torch.allclose(a, noisy)
    assert torch.equal(noisy, d.sample(4, seed=1, sampler="ddim", steps=10, eta=1.0))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda z, t: ops.ddim_step(z, z, t, t, S, seed=0), "t_prev"),
        (lambda z, t: ops.ddim_step(z, z, t, t - 5, S, seed=0, eta=2.0), "eta"),
        (lambda z, t: ops.ddim_step(z, z, t, (t - 1)[:1], S, seed=0), "t_prev"),
    ],
)
def test_bad_input(call, match):
    z = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=match):
        call(z, torch.tensor([10, 20]))


@pytest.mark.parametrize("kwargs,match", [(dict(steps=0), "steps"), (dict(eta=-1.0), "eta")])
def test_bad_sample_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_diffusion(0.0, 1.0, T=20).sample(2, sampler="ddim", **kwargs)


def test_clip_x0_clamps_the_prediction():
    z = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)
    pred = torch.zeros_like(z)  # x0 = z / sqrt(a_t) > 1
    t, t_prev = torch.tensor([10]), torch.tensor([-1])
    assert float(ops.ddim_step(z, pred, t, t_prev, S, seed=0).min()) > 3.0
    torch.testing.assert_close(
        ops.ddim_step(z, pred, t, t_prev, S, seed=0, clip_x0=True), torch.ones_like(z)
    )
    with pytest.raises(ValueError, match="clip_x0"):
        gaussian_diffusion(0.0, 1.0, T=20).sample(2, clip_x0=True)
