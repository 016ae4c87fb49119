"""The samplers package's shared parts: latents=, and SamplerSpec as sample(), the training
grids and the CLI use it (the per-sampler maths is tested in test_ddim.py, test_sampling.py,
test_ddpm_clip.py and test_dpm_solver.py)."""

import pytest
import torch
from test_ddim import ddim_gaussian_prediction
from test_sampling import gaussian_diffusion

import fastdiff
from fastdiff.samplers import SamplerSpec, initial_noise

CPU = torch.device("cpu")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_latents_replace_the_seeded_noise(sampler):
    d = gaussian_diffusion(0.1, 0.4, T=20)
    z_T = torch.cat([initial_noise((2, 1, 4, 4), CPU, 7, b, False) for b in range(2)])
    kept = z_T.clone()
    steps = None if sampler == "ddpm" else 5
    got = d.sample(4, seed=7, batch_size=2, sampler=sampler, steps=steps, latents=z_T)
    assert torch.equal(got, d.sample(4, seed=7, batch_size=2, sampler=sampler, steps=steps))
    assert torch.equal(z_T, kept)  # the caller's latents are not written


def test_a_chain_starts_from_the_given_latents():
    """Deterministic DDIM with the exact Gaussian denoiser is affine in z_T: each image is
    gain * z_T + offset (closed form in test_ddim), from the latents given, not seeded noise."""
    mean, std = -0.2, 0.3
    d = gaussian_diffusion(mean, std)
    z_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    x = d.sample(3, seed=0, sampler="ddim", steps=20, clip_x0=False, latents=z_T).double()
    offset, gain = ddim_gaussian_prediction(d.schedule, mean, std, 20)
    torch.testing.assert_close(x, (gain * z_T.double() + offset).clamp(-1, 1), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "latents,error,match",
    [
        (torch.zeros(3, 1, 4, 4), ValueError, r"latents: expected shape \(2, 1, 4, 4\)"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), TypeError, "latents: expected a floating"),
        (torch.zeros(2, 1, 4, 4, device="meta"), ValueError, "latents: expected a tensor on"),
        ([0.0], TypeError, "latents: expected a torch.Tensor"),
    ],
)
def test_bad_latents(latents, error, match):
    with pytest.raises(error, match=match):
        gaussian_diffusion(0.0, 1.0, T=20).sample(2, sampler="dpm++2m", steps=3, latents=latents)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampler="dpm++2m", steps=20), "steps: dpm\\+\\+2m takes at most T-1=19"),
        (dict(sampler="dpm++2m", eta=0.5), "eta: only the ddim sampler"),
        (dict(sampler=SamplerSpec("ddim", 5), steps=5), "steps: leave it unset"),
        (dict(sampler="dpm++3m"), "sampler: expected one of"),
    ],
)
def test_bad_sampler_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_diffusion(0.0, 1.0, T=20).sample(2, **kwargs)


def test_a_spec_samples_like_its_keywords():
    d = gaussian_diffusion(0.1, 0.4, T=20)
    spec = SamplerSpec("ddim", 5, clip_rule="diffusers")
    keywords = d.sample(3, seed=1, sampler="ddim", steps=5, clip_rule="diffusers")
    assert torch.equal(d.sample(3, seed=1, sampler=spec), keywords)
    with pytest.raises(ValueError, match="sample_sampler"):
        fastdiff.train(torch.zeros(2, 1, 8, 8), steps=1, batch_size=2, sample_sampler="euler")
