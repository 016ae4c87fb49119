"""sample(): shape, determinism, the CUDA-graph path, and the analytic Gaussian case."""

import math

import pytest
import torch
from helpers import DEVICE
from torch import nn

import fastdiff
from fastdiff import Diffusion, NoiseSchedule


class GaussianOptimalDenoiser(nn.Module):
    """The exact eps-predictor for data x ~ N(m, s^2 I):

    E[eps | z_t] = sqrt(1 - a_t) (z_t - sqrt(a_t) m) / (a_t s^2 + 1 - a_t)
    """

    def __init__(self, schedule: NoiseSchedule, mean: float, std: float):
        super().__init__()
        self.register_buffer("ac", schedule.alphas_cumprod.float())
        self.mean, self.var = mean, std**2
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, z, t):
        a = self.ac[t].view(-1, 1, 1, 1)
        return torch.sqrt(1 - a) * (z - torch.sqrt(a) * self.mean) / (a * self.var + 1 - a)


def gaussian_diffusion(mean, std, T=1000, shape=(1, 4, 4)):
    schedule = NoiseSchedule.linear(T)
    model = GaussianOptimalDenoiser(schedule, mean, std)
    return Diffusion(model, schedule, shape, config={"precision": "fp32"})


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_gaussian_data_is_recovered(variance):
    """With the optimal denoiser, DDPM samples have the data's mean and variance."""
    mean, std, n = 0.3, 0.2, 1024
    images = gaussian_diffusion(mean, std).sample(n, seed=0, variance=variance)
    x = images.double().flatten()
    N = x.numel()
    # 16 pixels per image are independent under the optimal denoiser; 6 standard errors.
    assert abs(float(x.mean()) - mean) < 6 * std / math.sqrt(N)
    # sigma_t^2 = beta_t is not the exact reverse variance, so allow 5% on the std as well.
    assert float(x.std()) == pytest.approx(std, rel=0.05)


def test_shape_range_and_determinism():
    d = gaussian_diffusion(0.0, 2.0, T=20)  # wide data: clamping to [-1, 1] kicks in
    a = d.sample(5, seed=7, batch_size=2)
    assert a.shape == (5, 1, 4, 4) and a.dtype == torch.float32
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert torch.equal(a, d.sample(5, seed=7, batch_size=2))
    assert not torch.equal(a, d.sample(5, seed=8, batch_size=2))
    # Batch b always gets the same stream: the first batch does not depend on n.
    assert torch.equal(a[:2], d.sample(2, seed=7, batch_size=2))


def test_sampling_through_triton_kernels_matches_reference(monkeypatch):
    """The eager sampler over the Triton reverse step (interpreter) equals the reference."""
    pytest.importorskip("triton")
    d = gaussian_diffusion(0.1, 0.5, T=10).to(DEVICE)
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    want = d.sample(3, seed=1)
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    got = d.sample(3, seed=1)
    # Compiled (CUDA) noise may differ from the reference's by noise_bound per element and
    # step (kernels.common); this denoiser contracts z, so T steps add at most
    # sum_t sigma_t * max_R noise_bound(R).  The interpreter's noise is the reference's.
    from fastdiff.kernels.reference import noise_bound

    worst = float(noise_bound(torch.zeros(1)))  # the bound's maximum, at R -> 0
    slack = 0.0 if DEVICE.type == "cpu" else float(d.schedule.sigma_beta.sum()) * worst
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 + slack)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=0), "n:"),
        (dict(n=2, batch_size=0), "batch_size"),
        (dict(n=2, seed=-1), "seed"),
        (dict(n=2, steps=10), "steps"),
        (dict(n=2, sampler="euler"), "sampler"),
        (dict(n=2, variance="big"), "variance"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_diffusion(0.0, 1.0, T=20).sample(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    d = fastdiff.train(
        torch.rand(8, 1, 8, 8) * 2 - 1,
        preset="tiny",
        steps=2,
        batch_size=4,
        T=20,
        device="cpu",
        progress=False,
    )
    d.save(tmp_path / "model")
    # device="cpu": same seed, same images holds on one device and backend (on a GPU machine
    # load() would otherwise put the model on CUDA).
    loaded = fastdiff.load(tmp_path / "model", device="cpu")
    assert loaded.image_shape == (1, 8, 8) and loaded.schedule.T == 20
    torch.testing.assert_close(loaded.sample(2, seed=3), d.sample(2, seed=3))
    from_path = fastdiff.sample(tmp_path / "model", 2, seed=3, device="cpu")
    assert torch.equal(from_path, loaded.sample(2, seed=3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_matches_eager():
    d = gaussian_diffusion(0.1, 0.5, T=100).to("cuda")
    eager = d.sample(8, seed=3, cuda_graph=False)
    graph = d.sample(8, seed=3, cuda_graph=True, strict=True)  # strict: no eager fallback
    assert graph.is_cuda
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    unet = fastdiff.train(
        torch.rand(16, 1, 8, 8) * 2 - 1,
        preset="tiny",
        steps=2,
        batch_size=8,
        T=50,
        device="cuda",
        progress=False,
    )
    torch.testing.assert_close(
        unet.sample(4, seed=1, cuda_graph=True, strict=True),
        unet.sample(4, seed=1, cuda_graph=False),
        rtol=1e-3,
        atol=1e-3,
    )


# -- the DDPM variances against their closed-form recursion -----------------------------------


def ddpm_gaussian_prediction(betas, mean, std, variance):
    """Mean and variance of DDPM samples (Algorithm 20.2, from z_T ~ N(0, 1)) for data
    N(mean, std^2) with the optimal denoiser, in float64, with the largest |x0| prediction
    (in standard deviations from the clamp at +-1) met along the way.

    The denoiser is linear in z: eps = g_t (z - sqrt(a_t) mean), g_t = sqrt(1 - a_t) /
    (a_t v + 1 - a_t), v = std^2.  So every reverse step is linear-Gaussian,
        z_{t-1} = A_t z_t + B_t + sigma_t eps',
        A_t = (1 - beta_t g_t / sqrt(1 - a_t)) / sqrt(1 - beta_t),
        B_t = beta_t g_t sqrt(a_t) mean / (sqrt(1 - a_t) sqrt(1 - beta_t)),
    with sigma_t^2 = beta_t ("beta") or beta_t (1 - a_{t-1}) / (1 - a_t) ("posterior"),
    and 0 at the last step: mean and variance follow M <- A M + B, V <- A^2 V + sigma^2.
    """
    v = std**2
    ac, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        ac.append(prod)
    M, V, clamp_margin = 0.0, 1.0, math.inf
    for i in reversed(range(len(betas))):
        b, a = betas[i], ac[i]
        a_prev = ac[i - 1] if i > 0 else 1.0
        g = math.sqrt(1 - a) / (a * v + 1 - a)
        # x0 = (z - sqrt(1 - a) eps) / sqrt(a) = c z + d: how far +-1 is, in its std devs.
        c = (1 - math.sqrt(1 - a) * g) / math.sqrt(a)
        d = math.sqrt(1 - a) * g * math.sqrt(a) * mean / math.sqrt(a)
        x0_mean, x0_std = c * M + d, abs(c) * math.sqrt(V)
        clamp_margin = min(clamp_margin, (1 - abs(x0_mean)) / x0_std)
        A = (1 - b * g / math.sqrt(1 - a)) / math.sqrt(1 - b)
        B = b * g * math.sqrt(a) * mean / (math.sqrt(1 - a) * math.sqrt(1 - b))
        if i == 0:
            sigma2 = 0.0
        elif variance == "beta":
            sigma2 = b
        else:
            sigma2 = b * (1 - a_prev) / (1 - a)
        M, V = A * M + B, A * A * V + sigma2
    return M, V, clamp_margin


@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_variance_matches_its_closed_form(variance, clip_x0):
    """fastdiff.sample end to end (on DEVICE: the fused kernel and the CUDA graph on a GPU),
    4096 images of 16 independent pixels, 20 steps of a linear schedule from 1e-3 to 0.3
    (alpha_T ~ 0.03), data N(0.1, 0.1^2): the sample mean and variance equal the recursion's
    for the variance asked for, within 5 standard errors (+-2.8% on the variance), and the
    other variance's prediction is rejected (std 0.143 for beta, 0.062 for posterior: some
    800 standard errors apart).  clip_x0=True: the clipped step computes
    mu + c0 (clamp(x0) - x0), which is mu while x0 stays in [-1, 1]; the recursion confirms
    that the x0 predictions stay over 6 standard deviations inside, at every step (so
    neither clipping nor the final clamp to [-1, 1] acts: the chain stays linear)."""
    mean, std, n = 0.1, 0.1, 4096
    schedule = NoiseSchedule.linear(20, beta_start=1e-3, beta_end=0.3)
    model = GaussianOptimalDenoiser(schedule, mean, std)
    d = Diffusion(model, schedule, (1, 4, 4), config={"precision": "fp32"}).to(DEVICE)
    images = fastdiff.sample(d, n, seed=0, batch_size=1024, variance=variance, clip_x0=clip_x0)
    assert images.shape == (n, 1, 4, 4) and images.device.type == DEVICE.type
    x = images.double().flatten().cpu()
    N = x.numel()
    sample_mean, sample_var = float(x.mean()), float(x.var())
    # Standard error of the sample variance from the sample's 4th central moment:
    # Var(s^2) = (mu4 - sigma^4 (N - 3) / (N - 1)) / N (no normality assumed).
    mu4 = float(((x - x.mean()) ** 4).mean())
    se_var = math.sqrt((mu4 - sample_var**2 * (N - 3) / (N - 1)) / N)
    betas = schedule.betas.tolist()
    want = {v: ddpm_gaussian_prediction(betas, mean, std, v) for v in ("beta", "posterior")}
    want_mean, want_var, margin = want[variance]
    other = want["posterior" if variance == "beta" else "beta"][1]
    assert margin > 6
    assert abs(sample_mean - want_mean) < 5 * math.sqrt(want_var / N), (sample_mean, want_mean)
    assert abs(sample_var - want_var) < 5 * se_var, (sample_var, want_var, se_var)
    assert abs(sample_var - other) > 50 * se_var, (sample_var, other, se_var)


class DepthwiseModel(nn.Module):
    """A user's model with a depthwise 1x1 conv, whose (C, 1, 1, 1) weight has strides that
    fit both memory layouts."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(1, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 1, groups=4)
        self.out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, z, t):
        return self.out(self.depthwise(self.inp(z)))


def test_channels_last_sampling_moves_no_weight_already_in_that_layout(reference_backend):
    """sample(channels_last=True) converts the model in place, but a tensor whose layout is
    already right keeps its memory: ``module.to(memory_format=...)`` would copy the (4, 1, 1, 1)
    weight at every call, and a captured training step (whose EMA update writes the old
    address) would silently stop updating it after the first sample grid."""
    model = DepthwiseModel()
    d = Diffusion(model, NoiseSchedule.linear(4), (1, 4, 4))
    depthwise = model.depthwise.weight.data_ptr()
    kw = dict(sampler="ddim", steps=2, seed=0, precision="fp32", channels_last=True)
    first = d.sample(2, **kw)
    assert model.out.weight.is_contiguous(memory_format=torch.channels_last)  # converted
    assert not model.out.weight.is_contiguous()
    out = model.out.weight.data_ptr()
    assert torch.equal(d.sample(2, **kw), first)
    assert model.depthwise.weight.data_ptr() == depthwise and model.out.weight.data_ptr() == out
