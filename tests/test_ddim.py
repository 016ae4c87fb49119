"""DDIM (Song et al. 2021): its algebra against DDPM, and the analytic Gaussian case."""

import math

import numpy as np
import pytest
import torch
from test_sampling import GaussianOptimalDenoiser, gaussian_diffusion

from fastdiff import Diffusion, NoiseSchedule, ops
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
    for rule in ops.CLIP_RULES:  # the last step returns x0 itself: clamped by either rule
        torch.testing.assert_close(
            ops.ddim_step(z, pred, t, t_prev, S, seed=0, clip_x0=True, clip_rule=rule),
            torch.ones_like(z),
        )


def test_clip_rules_in_closed_form():
    """One step with a clamped x0, against the two formulas written out."""
    z = torch.tensor([3.0, -0.5, 0.2, -2.5], dtype=torch.float64).view(4, 1, 1, 1)
    pred = torch.tensor([0.1, -0.3, 0.9, 0.0], dtype=torch.float64).view(4, 1, 1, 1)
    t, t_prev = torch.tensor([300, 300, 600, 20]), torch.tensor([200, 100, 400, 0])
    a = S.alphas_cumprod[t].view(-1, 1, 1, 1)
    a_prev = S.alphas_cumprod[t_prev].view(-1, 1, 1, 1)
    x0 = ((z - torch.sqrt(1 - a) * pred) / torch.sqrt(a)).clamp(-1, 1)
    eps = (z - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
    want = {
        "rederive": torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev) * eps,
        "diffusers": torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev) * pred,
    }
    for rule, expected in want.items():
        got = ops.ddim_step(z, pred, t, t_prev, S, seed=0, clip_x0=True, clip_rule=rule)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Rows whose x0 is inside [-1, 1] (the second) are untouched by clipping, bit for bit.
    plain = ops.ddim_step(z, pred, t, t_prev, S, seed=0)
    got = ops.ddim_step(z, pred, t, t_prev, S, seed=0, clip_x0=True)
    assert torch.equal(got[1], plain[1]) and not torch.allclose(got[0], plain[0])


def test_eta_one_clipped_step_is_ddpm_with_clipped_posterior_mean():
    """eta = 1 with the re-derived eps is the DDPM step with improved-diffusion's
    clip_denoised and the posterior variance; the diffusers rule is not."""
    gen = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=gen)
    pred, noise = torch.randn(2, 6, 1, 4, 4, dtype=torch.float64, generator=gen)
    t = torch.tensor([999, 700, 300, 50, 5, 1])
    ddpm = ops.reverse_step(z, pred, t, S, noise, variance="posterior", clip_x0=True)
    ddim = ops.ddim_step(z, pred, t, t - 1, S, noise, eta=1.0, clip_x0=True)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)
    diffusers = ops.ddim_step(
        z, pred, t, t - 1, S, noise, eta=1.0, clip_x0=True, clip_rule="diffusers"
    )
    assert not torch.allclose(diffusers, ddpm, rtol=1e-3, atol=1e-3)


class ShrunkGaussianDenoiser(GaussianOptimalDenoiser):
    """The optimal eps-predictor for N(m, s^2) data, scaled by ``k`` (< 1: it under-predicts
    the noise, as a not fully trained network does).  Its x0 = (z - sqrt(1 - a) eps) / sqrt(a)
    then overshoots [-1, 1] at high noise, by (1 - k) sqrt((1 - a) / a) |eps|, so clipping is
    active on most of the trajectory while the data lie well inside [-1, 1]."""

    def __init__(self, schedule, mean, std, k):
        super().__init__(schedule, mean, std)
        self.k = k

    def forward(self, z, t):
        return self.k * super().forward(z, t)


def test_rederived_eps_converges_as_steps_grow_and_the_diffusers_rule_drifts():
    """Deterministic DDIM with clipping, 50 / 250 / 1000 steps from the same z_T.

    Re-deriving eps from the clamped x0 makes DDIM a first-order discretisation of the ODE of
    the clamped denoiser: the distance to the 1000-step result falls ~5x from 50 to 250 steps.
    Keeping the model's eps moves z by sqrt(a_prev) (x0_clamped - x0) at every step whatever
    its size, so more steps move it further: the spread of the samples collapses."""
    mean, std = 0.3, 0.3
    model = ShrunkGaussianDenoiser(S, mean, std, k=0.98)
    d = Diffusion(model, S, (1, 4, 4), config={"precision": "fp32"})
    z = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    t = torch.full((4096,), S.T - 1)
    a = S.alphas_cumprod[-1].float()
    x0 = (z - torch.sqrt(1 - a) * model(z, t)) / torch.sqrt(a)
    assert float((x0.abs() > 1).float().mean()) > 0.5  # clipping is active at the first step

    def run(steps, **kw):
        kw.setdefault("clip_x0", True)
        return d.sample(64, seed=0, sampler="ddim", steps=steps, **kw).double()

    def gap(rule, steps):
        return float((run(steps, clip_rule=rule) - run(1000, clip_rule=rule)).abs().mean())

    rederive_50, rederive_250 = gap("rederive", 50), gap("rederive", 250)
    diffusers_250 = gap("diffusers", 250)
    assert rederive_250 < rederive_50 / 3  # first order: ~1/5
    assert diffusers_250 > 5 * rederive_250
    # The limits: re-derive stays near the unclipped ODE (data std 0.3); diffusers collapses.
    std_rederive = float(run(1000, clip_rule="rederive").std())
    std_unclipped = float(run(1000, clip_x0=False).std())
    std_diffusers = float(run(1000, clip_rule="diffusers").std())
    assert std_rederive == pytest.approx(std_unclipped, rel=0.05)
    assert std_rederive == pytest.approx(std, rel=0.15)  # k = 0.98 widens it a little (~0.33)
    assert std_diffusers < 0.75 * std_rederive


def test_ddim_and_ddpm_default_clipping():
    """ddim clips (re-derive) by default; ddpm does not, unless asked."""
    model = ShrunkGaussianDenoiser(S.to("cpu"), 0.3, 0.3, k=0.98)
    d = Diffusion(model, NoiseSchedule.linear(1000), (1, 4, 4), config={"precision": "fp32"})
    ddim = d.sample(8, seed=2, sampler="ddim", steps=20)
    assert torch.equal(ddim, d.sample(8, seed=2, sampler="ddim", steps=20, clip_x0=True))
    assert not torch.equal(ddim, d.sample(8, seed=2, sampler="ddim", steps=20, clip_x0=False))
    assert not torch.equal(
        ddim, d.sample(8, seed=2, sampler="ddim", steps=20, clip_rule="diffusers")
    )
    ddpm = d.sample(8, seed=2)
    assert torch.equal(ddpm, d.sample(8, seed=2, clip_x0=False))
    assert not torch.equal(ddpm, d.sample(8, seed=2, clip_x0=True))


@pytest.mark.parametrize(
    "call",
    [
        lambda z, t: ops.ddim_step(z, z, t, t - 1, S, seed=0, clip_x0=True, clip_rule="clamp"),
        lambda z, t: ops.ddim_step(z, z, t, t - 1, S, seed=0, clip_rule=None),
        lambda z, t: gaussian_diffusion(0.0, 1.0, T=20).sample(
            2, sampler="ddim", clip_rule="Diffusers"
        ),
    ],
)
def test_bad_clip_rule(call):
    with pytest.raises(ValueError, match="clip_rule"):
        call(torch.zeros(2, 1, 2, 2), torch.tensor([10, 20]))


def test_bad_clip_x0():
    with pytest.raises(TypeError, match="clip_x0"):
        gaussian_diffusion(0.0, 1.0, T=20).sample(2, clip_x0="yes")
    z, t = torch.zeros(2, 1, 2, 2), torch.tensor([10, 20])
    with pytest.raises(TypeError, match="clip_x0"):
        ops.reverse_step(z, z, t, S, seed=0, clip_x0=1)


def test_cli_sample_clip_flags(tmp_path, monkeypatch, capsys):
    """`fastdiff sample --clip/--no-clip/--clip-rule` give what sample() gives."""
    import fastdiff.diffusion
    from fastdiff.cli import main
    from fastdiff.images import to_uint8

    d = Diffusion(
        ShrunkGaussianDenoiser(S, 0.3, 0.3, k=0.9), S, (1, 4, 4), config={"precision": "fp32"}
    )
    monkeypatch.setattr(fastdiff.diffusion, "load", lambda path, device=None: d)
    cases = [
        (["--sampler", "ddim", "--steps", "20"], dict(sampler="ddim", steps=20)),
        (
            ["--sampler", "ddim", "--steps", "20", "--clip-rule", "diffusers"],
            dict(sampler="ddim", steps=20, clip_rule="diffusers"),
        ),
        (
            ["--sampler", "ddim", "--steps", "20", "--no-clip"],
            dict(sampler="ddim", steps=20, clip_x0=False),
        ),
        (["--sampler", "ddpm"], dict()),
        (["--sampler", "ddpm", "--clip"], dict(clip_x0=True)),
        ([], dict(sampler="dpm++2m")),  # the CLI's default sampler (the API's is ddpm)
    ]
    results = []
    for flags, kwargs in cases:
        out = tmp_path / "x.npz"
        assert main(["sample", "ckpt", "-n", "4", "--out", str(out), "--no-progress", *flags]) == 0
        got = torch.from_numpy(np.load(out)["images"])
        assert torch.equal(got, to_uint8(d.sample(4, seed=0, **kwargs))), flags
        results.append(got)
    # Each flag mattered: rederive != diffusers != no clip; ddpm clip on != off.
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])
    assert not torch.equal(results[3], results[4])
    for bad in (["--clip-rule", "clamp"], ["--clip", "--no-clip"]):
        with pytest.raises(SystemExit):
            main(["sample", "ckpt", *bad])
    capsys.readouterr()


def test_training_grid_sampler(tmp_path):
    """train(sample_sampler="ddim", sample_steps=k) draws its final grid with that sampler;
    bad grid settings fail before any training step."""
    from PIL import Image

    from fastdiff import save_image_grid, train

    data = torch.rand(8, 1, 8, 8) * 2 - 1
    kw = dict(preset="tiny", batch_size=4, T=20, device="cpu", progress=False, n_samples=4)
    d = train(data, steps=2, out_dir=tmp_path / "run", sample_sampler="ddim", sample_steps=5, **kw)
    save_image_grid(d.sample(4, seed=0, sampler="ddim", steps=5), tmp_path / "want.png", scale=8)
    got = np.asarray(Image.open(tmp_path / "run" / "samples.png"))
    assert np.array_equal(got, np.asarray(Image.open(tmp_path / "want.png")))
    save_image_grid(d.sample(4, seed=0), tmp_path / "ddpm.png", scale=8)
    assert not np.array_equal(got, np.asarray(Image.open(tmp_path / "ddpm.png")))
    for bad, match in [
        (dict(sample_sampler="euler"), "sample_sampler"),
        (dict(sample_sampler="ddim", sample_steps=21), "sample_steps"),
        (dict(sample_steps=5), "sample_steps"),  # ddpm runs all T steps
    ]:
        with pytest.raises(ValueError, match=match):
            train(data, steps=2, out_dir=tmp_path / "bad", **bad, **kw)
        assert not (tmp_path / "bad" / "checkpoints").exists()
