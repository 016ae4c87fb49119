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


class _EmulatedCapture:
    """torch.cuda's stream and graph API on CPU: a capture runs nothing and records the
    sampler's step; a replay runs it.  Every executed step's t is recorded."""

    def __init__(self, monkeypatch, sampler):
        from contextlib import contextmanager, nullcontext

        self.capturing, self.ts = False, []
        real_step = sampler.step

        def step(buf):
            if self.capturing:
                self.graph.body = lambda: real_step(buf)
                return
            self.ts.extend(buf.t.tolist())
            real_step(buf)

        class Graph:
            def replay(graph):
                graph.body()

        @contextmanager
        def graph(g):
            self.graph, self.capturing = g, True
            yield
            self.capturing = False

        class Stream:
            def wait_stream(self, other):
                pass

        monkeypatch.setattr(sampler, "step", step)
        for name, fake in [("Stream", Stream), ("current_stream", Stream), ("CUDAGraph", Graph),
                           ("graph", graph), ("stream", lambda s: nullcontext()),
                           ("device", lambda d: nullcontext())]:  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, fake)


@pytest.mark.parametrize("T,kind,steps", [(2, "ddpm", None), (20, "ddpm", None), (20, "ddim", 2)])
def test_graph_path_emulated_on_cpu_replays_the_eager_chain(monkeypatch, T, kind, steps):
    """The capture's warm-up never steps past t = 0 (T = 2: three warm-up steps of a 2-step
    chain), draws nothing from the default generator, and capture + replays give the eager
    chain's samples."""
    from fastdiff.precision import resolve_precision
    from fastdiff.sampling import Sampler, StepBuffers

    d = gaussian_diffusion(0.1, 0.5, T=T)
    sampler = Sampler(d.model, d.schedule, precision=resolve_precision("fp32", torch.device("cpu")),
                      channels_last=False, sampler=kind, steps=steps)  # fmt: skip
    z0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    eager = sampler.run_eager(StepBuffers(z0.clone(), sampler.timesteps[0], 5)).clone()
    fake = _EmulatedCapture(monkeypatch, sampler)
    rng = torch.get_rng_state()
    graph = sampler.run_graph(z0, 5)
    assert torch.equal(torch.get_rng_state(), rng)  # the default generator (dropout) untouched
    assert fake.ts and min(fake.ts) >= 0 and max(fake.ts) <= T - 1
    assert torch.equal(graph, eager)
    assert torch.equal(sampler.run_graph(z0, 5), eager)  # the cached graph, replayed again
