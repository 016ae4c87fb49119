"""The bound in bits/dim against closed forms, with an oracle denoiser that knows x."""

import math

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import Diffusion, NoiseSchedule
from fastdiff.elbo import bits_per_dim, elbo_terms, prior_kl


class Oracle(nn.Module):
    """Predicts the exact noise of z_t for known images x: (z - sqrt(a_t) x) / sqrt(1 - a_t)."""

    def __init__(self, schedule, x):
        super().__init__()
        self.register_buffer("x", x.double())
        self.register_buffer("ac", schedule.alphas_cumprod)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, z, t):
        a = self.ac[t].view(-1, 1, 1, 1)
        return ((z.double() - torch.sqrt(a) * self.x) / torch.sqrt(1 - a)).float()


def grid_images(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 1, 4, 4), generator=gen)
    pixels[:, :, 0, 0], pixels[:, :, 0, 1] = 0, 255  # both edge bins
    return pixels.double() / 127.5 - 1


def decoder_nats(x, std):
    """-log p(x | z_0) when the decoder mean is exactly x: one bin around the mean."""
    c = torch.tensor(1 / 255 / std, dtype=torch.float64)
    inner = torch.log(torch.special.ndtr(c) - torch.special.ndtr(-c))
    edge = torch.log(torch.special.ndtr(c))
    per = torch.where(x.abs() > 0.999, edge, inner)
    return -per.flatten(1).sum(1)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_oracle_bound_in_closed_form(variance):
    s = NoiseSchedule.linear(100)
    x = grid_images()
    terms = elbo_terms(Oracle(s, x), s, x.float(), seed=1, variance=variance)
    torch.testing.assert_close(
        terms["decoder"], decoder_nats(x, math.sqrt(1e-4)), rtol=1e-4, atol=1e-4
    )
    D = x[0].numel()
    if variance == "posterior":  # the oracle's mean is the posterior mean: every KL is 0
        want = torch.zeros(3, dtype=torch.float64)
    else:  # equal means, variances beta vs posterior: 0.5 (log(b / pv) + pv / b - 1) per dim
        b, pv = s.betas[1:], s.posterior_variance[1:]
        want = torch.full((3,), float(0.5 * (torch.log(b / pv) + pv / b - 1).sum()) * D)
    torch.testing.assert_close(terms["diffusion"], want.double(), rtol=1e-4, atol=1e-4)
    a = s.alphas_cumprod[-1]
    prior = 0.5 * (-torch.log(1 - a) + (1 - a) + a * x**2 - 1).flatten(1).sum(1)
    torch.testing.assert_close(terms["prior"], prior)
    torch.testing.assert_close(prior_kl(x, s), prior)


def test_bits_per_dim_adds_up_and_a_bad_model_scores_worse():
    s = NoiseSchedule.linear(50)
    x = grid_images(n=4)
    oracle = Diffusion(Oracle(s, x), s, (1, 4, 4))
    good = bits_per_dim(oracle, x.float(), batch_size=4, use_ema=False)
    assert good["bits_per_dim"] == pytest.approx(
        good["prior"] + good["diffusion"] + good["decoder"]
    )
    assert good["images"] == 4 and all(math.isfinite(v) for v in good.values())

    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, z, t):
            return torch.zeros_like(z)

    bad = bits_per_dim(Diffusion(Zero(), s, (1, 4, 4)), x.float(), batch_size=3)
    assert bad["bits_per_dim"] > good["bits_per_dim"] + 1.0
    assert bad["prior"] == pytest.approx(good["prior"])


def test_bad_input():
    s = NoiseSchedule.linear(10)
    d = Diffusion(Oracle(s, grid_images()), s, (1, 4, 4))
    with pytest.raises(ValueError, match="data"):
        bits_per_dim(d, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch_size"):
        bits_per_dim(d, torch.zeros(2, 1, 4, 4), batch_size=0)
    with pytest.raises(ValueError, match="variance"):
        elbo_terms(d.model, s, torch.zeros(3, 1, 4, 4), seed=0, variance="big")


def test_trained_model_bound_is_finite(tmp_path):
    x = (grid_images(n=16, seed=3)).float()
    d = fastdiff.train(
        x, preset="tiny", steps=3, batch_size=8, T=20, device="cpu", progress=False, image_size=None
    )
    result = bits_per_dim(d, x[:4], batch_size=4)
    assert math.isfinite(result["bits_per_dim"]) and result["bits_per_dim"] > 0
