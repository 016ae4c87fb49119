"""NoiseSchedule against its closed forms, and the reverse step's algebra on known noise."""

import math

import numpy as np
import pytest
import torch
from helpers import DEVICE

from fastdiff import NoiseSchedule, ops


def test_linear_closed_form():
    s = NoiseSchedule.linear(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=0, atol=0)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-14)
    # 0-based: index 0 is beta_1, and alpha_1 = 1 - beta_1.
    assert float(s.alphas_cumprod[0]) == 1 - 1e-4
    assert s.T == len(s) == 1000
    assert s.betas.dtype == torch.float64 and s.table("betas").dtype == torch.float32


def test_alphas_cumprod_is_the_product():
    s = NoiseSchedule([0.1, 0.2, 0.3])
    expected = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), expected, rtol=1e-15)
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy(), [1.0, 0.9, 0.72], rtol=1e-15)


def test_cosine_closed_form():
    T, sft = 50, 0.008
    s = NoiseSchedule.cosine(T)

    def f(t):
        return math.cos((t / T + sft) / (1 + sft) * math.pi / 2) ** 2

    for i in range(T - 1):  # the last beta is clipped at 0.999
        want = f(i + 1) / f(0)
        assert float(s.alphas_cumprod[i]) == pytest.approx(want, rel=1e-12)
    assert float(s.betas.max()) <= 0.999
    assert float(s.betas[-1]) == 0.999  # clipped
    assert bool((s.betas[1:] >= s.betas[:-1]).all())


def test_derived_tables():
    s = NoiseSchedule.linear(100)
    b, ac, acp = s.betas, s.alphas_cumprod, s.alphas_cumprod_prev
    torch.testing.assert_close(s.reverse_coef_z, 1 / torch.sqrt(1 - b))
    torch.testing.assert_close(s.reverse_coef_eps, b / torch.sqrt(1 - ac) / torch.sqrt(1 - b))
    torch.testing.assert_close(s.posterior_variance, b * (1 - acp) / (1 - ac))
    assert float(s.posterior_variance[0]) == 0.0
    torch.testing.assert_close(s.sigma_beta**2, b)


@pytest.mark.parametrize(
    "betas,message",
    [
        ([], "empty"),
        ([[0.1, 0.2]], "1-D"),
        ([0.1, 0.0], "open interval"),
        ([0.1, 1.0], "open interval"),
        ([0.1, -0.2], "open interval"),
        ([0.1, float("nan")], "finite"),
        ([0.1, float("inf")], "finite"),
        ("abc", "1-D sequence of numbers"),
    ],
)
def test_bad_betas(betas, message):
    with pytest.raises(ValueError, match=message) as info:
        NoiseSchedule(betas)
    assert "betas" in str(info.value)


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T"):
        NoiseSchedule.linear(T)


def test_from_name_and_config_round_trip():
    s = NoiseSchedule.from_name("cosine", 20)
    again = NoiseSchedule.from_config(s.config())
    assert again.name == "cosine" and torch.equal(again.betas, s.betas)
    with pytest.raises(ValueError, match="schedule"):
        NoiseSchedule.from_name("quadratic")


def test_to_device_keeps_tables():
    s = NoiseSchedule.linear(10)
    moved = s.to("meta")
    assert moved.device.type == "meta" and moved.betas.device.type == "meta"
    assert s.betas.device.type == "cpu" and s.to("cpu") is s


# -- the reverse step's algebra -----------------------------------------------------------------
#
# With z_t = sqrt(a_t) x + sqrt(1 - a_t) eps and pred = eps (the true noise of z_t),
#   mu(z_t, eps) = (z_t - b_t / sqrt(1 - a_t) eps) / sqrt(1 - b_t)
#               = sqrt(a_{t-1}) x + (1 - a_t - b_t) / (sqrt(1 - a_t) sqrt(1 - b_t)) eps,
# which is exactly the mean of the posterior q(z_{t-1} | z_t, x).  At index 0 (t = 1),
# a_1 = 1 - b_1 makes the eps coefficient vanish, so the last step returns x exactly; and a
# chain whose pred is always the true noise of the current z (an oracle denoiser) ends at x
# whatever noise it injected on the way.


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("FASTDIFF_BACKEND", request.param)
    return request.param


def test_mean_with_true_noise_is_the_posterior_mean(reference_backend):
    s = NoiseSchedule.linear(1000)
    T = s.T
    x = torch.randn(T, 3, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x)
    t = torch.arange(T)
    z = ops.q_sample(x, t, s, eps)
    mu = ops.reverse_step(z, eps, t, s, torch.zeros_like(x))  # zero noise: the mean
    c_x = s.posterior_mean_coef_x0.view(-1, 1, 1, 1)
    c_z = s.posterior_mean_coef_z.view(-1, 1, 1, 1)
    torch.testing.assert_close(mu, c_x * x + c_z * z, rtol=1e-10, atol=1e-10)
    # ... and equals sqrt(a_{t-1}) x + c_t eps with the closed-form c_t above.
    a, b = s.alphas_cumprod.view(-1, 1, 1, 1), s.betas.view(-1, 1, 1, 1)
    c_t = (1 - a - b) / (torch.sqrt(1 - a) * torch.sqrt(1 - b))
    want = torch.sqrt(s.alphas_cumprod_prev).view(-1, 1, 1, 1) * x + c_t * eps
    torch.testing.assert_close(mu, want, rtol=1e-10, atol=1e-10)


def test_last_step_with_true_noise_returns_x(backend):
    s = NoiseSchedule.linear(1000).to(DEVICE)
    x = torch.rand(4, 3, 5, 5, device=DEVICE) * 2 - 1
    eps = torch.randn_like(x)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    z1 = ops.q_sample(x, t, s, eps)
    torch.testing.assert_close(ops.reverse_step(z1, eps, t, s, seed=3), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_oracle_chain_recovers_x(backend, variance):
    """T reverse steps from pure noise, pred = the true noise of the current z, give back x."""
    s = NoiseSchedule.linear(100).to(DEVICE)
    dtype = torch.float32
    x = torch.rand(2, 1, 4, 4, dtype=dtype, device=DEVICE) * 2 - 1
    z = torch.randn_like(x)
    for i in reversed(range(s.T)):
        t = torch.full((2,), i, dtype=torch.long, device=DEVICE)
        a = s.sqrt_alphas_cumprod[i].to(dtype)
        b = s.sqrt_one_minus_alphas_cumprod[i].to(dtype)
        pred = (z - a * x) / b
        z = ops.reverse_step(z, pred, t, s, seed=1000 + i, variance=variance)
    torch.testing.assert_close(z, x, rtol=0, atol=1e-4)
