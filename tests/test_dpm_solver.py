"""DPM-Solver++ (2M): the fused step against its reference, diffusers' scheduler trajectory,
the closed-form Gaussian case, the captured step, and latents= / SamplerSpec checks."""

import math

import numpy as np
import pytest
import torch
from helpers import (
    DEVICE,
    assert_within_ulp,
    fma_slack,
    interpreter_rounds_bf16,
    require_interpreter,
    with_layout,
)
from test_sampling import GaussianOptimalDenoiser, gaussian_diffusion
from torch import nn

from fastdiff import NoiseSchedule, ops
from fastdiff.precision import resolve_precision
from fastdiff.samplers import SamplerRunner, SamplerSpec
from fastdiff.samplers.dpm_solver import dpm_coefficients, dpm_timesteps

CPU = torch.device("cpu")
FP32 = resolve_precision("fp32", CPU)
S = NoiseSchedule.linear(1000)


# -- the fused step -------------------------------------------------------------------------


def _step_inputs(dtype, layout, shape=(2, 4, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    z, pred, uncond, prev = (3 * torch.randn(shape, generator=g) for _ in range(4))
    return [with_layout(x.to(DEVICE, dtype), layout) for x in (z, pred, uncond, prev)]


#: Rows 0 (first order, C = 0) and 5 (second order) of a 10-step table on the linear schedule.
COEFS = torch.from_numpy(dpm_coefficients(S._np["alphas_cumprod"], dpm_timesteps(1000, 10)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("row", [0, 5])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_kernel_matches_reference(monkeypatch, triton_backend, dtype, layout, row, clip_x0):
    """z' and the stored x0 equal the fp32 formula written here in the kernel's operation
    order, rounded to the dtype: bit for bit in the interpreter (its bf16 truncation patched
    to round to nearest even, as GPUs do); compiled, within the FMA contractions LLVM may
    make (helpers.fma_slack; x0's error passes to z' times |B| + |C|)."""
    interpreter_rounds_bf16(monkeypatch)
    z, pred, _, prev = _step_inputs(dtype, layout)
    coefs = COEFS.float().to(DEVICE)
    assert (coefs[row, 4] == 0) == (row == 0)  # row 0 is first order, row 5 second
    step = torch.tensor([row], device=DEVICE)
    x0_buf = prev.clone()
    got = ops.dpm_solver_step(z, pred, step, x0_buf, coefs, clip_x0=clip_x0)
    p, q, a, b, c = coefs[row].tolist()
    zf, pf, prevf = z.float(), pred.float(), prev.float()
    x0 = p * zf - q * pf
    x0 = x0.clamp(-1, 1) if clip_x0 else x0
    want = a * zf + b * x0 + c * (x0 - prevf)
    x0_slack = fma_slack(p * zf, q * pf)
    slack = fma_slack(a * zf, b * x0, c * (x0 - prevf)) + (abs(b) + abs(c)) * x0_slack
    assert got.dtype == dtype and got.is_contiguous(memory_format=_fmt(layout))
    assert_within_ulp(got, want, ulps=0, slack=slack, what="z'")
    assert_within_ulp(x0_buf, x0, ulps=0, slack=x0_slack, what="x0")


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_guidance_forms_eps_from_both_predictions(monkeypatch, backend, scale):
    """eps = uncond + s (pred - uncond): s = 0 is the unconditional step, s = 1 the plain one."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    z, pred, uncond, prev = _step_inputs(torch.float32, "contiguous", seed=1)
    coefs, step = COEFS.float().to(DEVICE), torch.tensor([5], device=DEVICE)
    guided = ops.dpm_solver_step(z, pred, step, prev.clone(), coefs, pred_uncond=uncond,
                                 guidance_scale=scale)  # fmt: skip
    eps = uncond.double() + scale * (pred.double() - uncond.double())
    p, q, a, b, c = COEFS[5].tolist()
    x0 = p * z.double() - q * eps
    want = a * z.double() + b * x0 + c * (x0 - prev.double())
    torch.testing.assert_close(guided.double(), want, rtol=1e-5, atol=1e-4)


def test_step_writes_in_place_and_checks_its_arguments():
    z, pred, _, prev = _step_inputs(torch.float32, "contiguous")
    coefs, step = COEFS.float(), torch.tensor([3])
    out = ops.dpm_solver_step(z.clone(), pred, step, prev.clone(), coefs)
    zz = z.clone()
    assert ops.dpm_solver_step(zz, pred, step, prev.clone(), coefs, out=zz) is zz
    torch.testing.assert_close(zz, out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="step: expected a row in 0..9"):
        ops.dpm_solver_step(z, pred, torch.tensor([10]), prev, coefs)
    with pytest.raises(TypeError, match="step:"):
        ops.dpm_solver_step(z, pred, torch.tensor([1.0]), prev, coefs)
    with pytest.raises(ValueError, match="coefs:"):
        ops.dpm_solver_step(z, pred, step, prev, coefs[:, :4])
    with pytest.raises(ValueError, match="x0_prev:"):
        ops.dpm_solver_step(z, pred, step, prev[:1], coefs)
    with pytest.raises(ValueError, match="pred_uncond:"):
        ops.dpm_solver_step(z, pred, step, prev, coefs, pred_uncond=pred[:1])


# -- diffusers' DPMSolverMultistepScheduler ------------------------------------------------


class TinyDenoiser(nn.Module):
    """A fixed, deterministic eps model: the Gaussian-optimal eps plus a t-dependent conv
    term (so x0 predictions differ from step to step in space and time)."""

    def __init__(self, schedule):
        super().__init__()
        self.gauss = GaussianOptimalDenoiser(schedule, 0.1, 0.5)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.fill_(0.05)

    def forward(self, z, t):
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        return self.gauss(z, t) + 0.2 * torch.tanh(self.conv(z)) * (0.5 + s)


def _diffusers_trajectory(model, schedule, z0, steps, **config):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.T, trained_betas=schedule.betas.numpy(),
        algorithm_type="dpmsolver++", solver_order=2, **config,
    )  # fmt: skip
    sched.set_timesteps(steps)
    z, traj = z0.clone(), []
    for t in sched.timesteps:
        z = sched.step(model(z, t), t, z).prev_sample
        traj.append(z)
    return [int(t) for t in sched.timesteps], traj


def _fastdiff_trajectory(model, schedule, z0, spec):
    runner = SamplerRunner(model, schedule, spec, precision=FP32, channels_last=False)
    buf, traj = runner.buffers(z0.clone(), 0), []
    for _ in range(runner.num_steps):
        runner.step(buf)
        traj.append(buf.z.clone())
    return runner.timesteps, traj


@pytest.mark.parametrize("steps,clip_x0", [(10, False), (20, False), (50, False), (20, True)])
def test_trajectory_equals_diffusers(reference_backend, steps, clip_x0):
    """Same model, betas and latents: every step's latents equal diffusers' within 1e-4
    (fp32; both compute in fp32, diffusers from fp32 alphas_cumprod).  clip_x0 is diffusers'
    thresholding=True with sample_max_value=1 (a clamp to [-1, 1])."""
    model = TinyDenoiser(S).eval()
    z0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want_t, want = _diffusers_trajectory(model, S, z0, steps, thresholding=clip_x0)
        spec = SamplerSpec("dpm++2m", steps, clip_x0=clip_x0, variance="beta")
        got_t, got = _fastdiff_trajectory(model, S, z0, spec)
    assert got_t == want_t
    assert len(got) == steps
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m, k=k: f"step {k}: {m}")


def test_kernel_sampler_equals_reference_sampler(monkeypatch):
    """The whole 10-step chain through the Triton kernel (interpreter) equals the reference."""
    pytest.importorskip("triton")
    require_interpreter()  # a CPU model and CPU tensors
    model = TinyDenoiser(S).eval()
    z0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    spec = SamplerSpec("dpm++2m", 10, clip_x0=False, variance="beta")
    with torch.no_grad():
        monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
        want = _fastdiff_trajectory(model, S, z0, spec)[1][-1]
        monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
        got = _fastdiff_trajectory(model, S, z0, spec)[1][-1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- the closed-form Gaussian case ---------------------------------------------------------


def dpm_gaussian_map(ac: np.ndarray, mean: float, std: float, steps: int):
    """(gain, offset): DPM-Solver++ 2M with the exact denoiser for data N(mean, std^2) maps
    z_T to gain z_T + offset (everything is affine in z_T).  Written from the paper's update
    (Lu et al. 2022, Algorithm 2, with diffusers' linspace steps and first-order ends)."""
    T, v = len(ac), std**2
    ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(int)
    alphas = [math.sqrt(ac[t]) for t in ts] + [1.0]  # alpha_t = sqrt(a), std_t = sqrt(1 - a)
    sigmas = [math.sqrt(1 - ac[t]) for t in ts] + [0.0]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas, strict=True)]
    z, prev = (1.0, 0.0), None  # z = gain, offset
    for k in range(steps):
        a = alphas[k] ** 2
        w = alphas[k] * v / (a * v + 1 - a)  # x0 = mean + w (z - alphas[k] mean)
        x0 = (w * z[0], mean + w * (z[1] - alphas[k] * mean))
        h = lam[k + 1] - lam[k]
        phi = -math.expm1(-h) if h != math.inf else 1.0
        if prev is None or k == steps - 1:
            d = x0
        else:
            r = (lam[k] - lam[k - 1]) / h
            d = tuple(x + (x - p) / (2 * r) for x, p in zip(x0, prev, strict=True))
        z = tuple(sigmas[k + 1] / sigmas[k] * zi + alphas[k + 1] * phi * di
                  for zi, di in zip(z, d, strict=True))  # fmt: skip
        prev = x0
    return z


@pytest.mark.parametrize("steps", [5, 10, 20, 200])
def test_gaussian_samples_match_the_closed_form(steps):
    """With the exact denoiser each image is gain * z_T + offset in closed form (checked
    from given latents); gain and offset approach the data's std and mean as steps grow."""
    mean, std = -0.2, 0.3
    d = gaussian_diffusion(mean, std)
    z_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    x = d.sample(4, sampler="dpm++2m", steps=steps, latents=z_T).double()
    gain, offset = dpm_gaussian_map(S._np["alphas_cumprod"], mean, std, steps)
    torch.testing.assert_close(x, (gain * z_T.double() + offset).clamp(-1, 1), rtol=0, atol=2e-5)
    if steps == 200:
        assert gain == pytest.approx(std, rel=0.01) and offset == pytest.approx(mean, abs=0.01)
    errors = [abs(dpm_gaussian_map(S._np["alphas_cumprod"], mean, std, n)[0] - std)
              for n in (5, 10, 20, 200)]  # fmt: skip
    assert errors == sorted(errors, reverse=True)


# -- the captured step ---------------------------------------------------------------------


def test_replayed_dpm_sampler_equals_the_eager_chain_bitwise(emulated_cuda):
    """One capture serves every step (first order, second order, the last to sigma = 0):
    replays equal the eager chain bit for bit, twice (the history buffer is reset)."""
    schedule = NoiseSchedule.linear(20)
    model = TinyDenoiser(schedule).eval()
    spec = SamplerSpec("dpm++2m", 5, clip_x0=True, variance="beta")
    runner = SamplerRunner(model, schedule, spec, precision=FP32, channels_last=False)
    z0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = runner.run_eager(runner.buffers(z0.clone(), 5)).clone()
        graph = runner.run_graph(z0, 5)
        again = runner.run_graph(z0, 5)
    assert emulated_cuda.captures == 1 and emulated_cuda.replays == 2 * runner.num_steps
    assert torch.equal(graph, eager) and torch.equal(again, eager)


@pytest.mark.parametrize("guided", [False, True])
def test_custom_op_passes_opcheck(triton_backend, guided):
    """fastdiff::dpm_solver_step: schema (out and x0_prev mutated), fake tensor, dispatch."""
    z, pred, uncond, prev = _step_inputs(torch.float32, "channels_last")
    args = (torch.empty_like(z), prev.clone(), z, pred, torch.tensor([5], device=DEVICE),
            COEFS.float().to(DEVICE), True, uncond if guided else None, 2.0)  # fmt: skip
    torch.library.opcheck(torch.ops.fastdiff.dpm_solver_step.default, args)
