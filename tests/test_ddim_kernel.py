"""The fused DDIM step (kernels/ddim.py, behind ops.ddim_step): values, noise, flags, gradients.

Forward: the kernel performs the fp32 operations of kernels.reference.ddim_step_reference in
the same order (correctly rounded sqrt and division included), then rounds once to the output
dtype.  So against the reference's fp32 result from the same inputs, rounded to the dtype:

    fp32, bf16, fp16 -- 0 ulp (helpers.EXACT["same_order"]) in the Triton interpreter (its
    fp32 -> bf16 truncation patched to round to nearest even, as GPUs do);
    compiled (CUDA) -- within ``compiled_slack``: the FMA contractions LLVM may make (one
    product's rounding each, propagated through the step's coefficients) and, with noise
    from a seed, sigma times kernels.reference.noise_bound.

That covers every dtype and layout, guidance s in {0, 1, 3} (and none), clipping off / both
rules, eta in {0, 0.5, 1} with a given noise tensor and per-sample t (one sample takes the
last step, t_prev = -1); noise from a seed in every tile layout of kernels.common.
Gradients (the custom op's backward, plain torch) are compared with torch.autograd through
the reference.  Sizes are small for the interpreter.
"""

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from helpers import (
    COMPILED,
    DEVICE,
    EXACT,
    U,
    assert_within_ulp,
    interpreter_rounds_bf16,
    is_layout,
    with_layout,
)

from fastdiff import NoiseSchedule, ops
from fastdiff.kernels import reference as ref

pytest.importorskip("triton")

from fastdiff.kernels import common, ddim  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LAYOUTS = ["contiguous", "channels_last"]
SCHEDULE = NoiseSchedule.linear(1000).to(DEVICE)
AC = SCHEDULE.table("alphas_cumprod")
#: Per-sample steps: a noisy step, a step to x0 (t_prev = -1), and (batch 3) the first step.
STEPS = {2: ([617, 20], [412, -1]), 3: ([999, 617, 20], [700, 412, -1])}
SEED = 1234


@pytest.fixture(autouse=True)
def _backend(triton_backend, monkeypatch):
    """The Triton kernels (the interpreter on CPU tensors), bf16 rounding to nearest even."""
    interpreter_rounds_bf16(monkeypatch)


def make_inputs(shape, dtype, layout):
    """(z, cond, uncond, noise, t, t_prev) in dtype and layout.  z lies on the forward path of
    x uniform in (-1.3, 1.3) with eps ~ N(0, 1), cond and uncond are eps plus 0.1 N(0, 1)
    each, so the predicted x0 is clamped in a good part of the elements, not in all."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout)).encode()))
    t, t_prev = (torch.tensor(v, device=DEVICE) for v in STEPS[shape[0]])
    a = AC[t].double().cpu().view(-1, 1, 1, 1)
    x = 1.3 * (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1)
    eps, cond, uncond, noise = (torch.randn(shape, generator=gen) for _ in range(4))
    z = torch.sqrt(a) * x + torch.sqrt(1 - a) * eps
    tensors = (z, eps + 0.1 * cond, eps + 0.1 * uncond, noise)
    return (*(with_layout(v.to(DEVICE, dtype), layout) for v in tensors), t, t_prev)


def reference(z, pred, t, t_prev, noise, **kw):
    """The reference's fp32 result from the upcast inputs (unrounded for 16-bit inputs)."""
    uncond = kw.pop("pred_uncond", None)
    kw["pred_uncond"] = None if uncond is None else uncond.float()
    noise = None if noise is None else noise.float()
    return ref.ddim_step_reference(z.float(), pred.float(), t, t_prev, AC, noise=noise, **kw)


def compiled_slack(z, pred, t, t_prev, noise, *, eta, noise_err=0.0, clip_x0=False,
                   clip_rule="rederive", pred_uncond=None, guidance_scale=1.0):  # fmt: skip
    """How far compiled code may move the result from the reference's fp32 operations (0 in
    the interpreter, which contracts nothing): LLVM may fuse each of the step's products into
    the following addition (one product's rounding skipped: U |a b|), in the guided eps,
    x0's numerator, the rederived eps, the output and the noise term, and in dir's argument
    1 - a_prev - sigma^2 (dir moves by U sigma^2 / (2 dir)); each error is carried to the
    output through the coefficients.  Plus sigma times the noise's own deviation."""
    if not COMPILED:
        return 0.0
    c = ref.ddim_coefficients(t, t_prev, AC.double(), eta)
    inv, s1, sp, dir_coef, sigma, back = (v.view(-1, 1, 1, 1) for v in c)
    p = pred.double()
    eps = p
    e_eps = torch.zeros_like(p)
    if pred_uncond is not None:
        u = pred_uncond.double()
        eps = u + guidance_scale * (p - u)
        e_eps = U * (guidance_scale * (p - u)).abs()
    x0 = (z.double() - s1 * eps) * inv
    e_x0 = (U * (s1 * eps).abs() + s1 * e_eps) * inv
    if clip_x0:
        clamped = x0.clamp(-1, 1)
        outside = (x0.abs() > 1).double()
        if clip_rule == "rederive":
            e_eps = e_eps + U * (back * (x0 - clamped)).abs() + back * e_x0 * outside
            eps = eps + back * (x0 - clamped)
        e_x0, x0 = e_x0 * (1 - outside), clamped
    e_dir = torch.where(dir_coef > 0, U * sigma**2 / (2 * dir_coef), (U * sigma**2).sqrt())
    err = sp * e_x0 + dir_coef * e_eps + e_dir * eps.abs()
    err = err + U * ((sp * x0).abs() + (dir_coef * eps).abs())
    if noise is not None:
        err = err + U * (sigma * noise.double()).abs()
    return err + sigma * noise_err


def assert_exact(got, z, pred, t, t_prev, noise, what, noise_err=0.0, **kw):
    """got is the reference's fp32 result rounded to got's dtype (EXACT same_order)."""
    want = reference(z, pred, t, t_prev, noise, **kw)
    slack = compiled_slack(z, pred, t, t_prev, noise, noise_err=noise_err, **kw)
    tol = EXACT[got.dtype]["same_order"]
    assert_within_ulp(got, want, got.dtype, tol, slack=slack, what=what)


def assert_x0_off_the_clamp_boundary(z, pred, t, t_prev, **kw):
    """No x0 within fp32 error of +-1 (where compiled FMAs could flip the clamp), and some
    on either side (the clamp is exercised)."""
    c = ref.ddim_coefficients(t, t_prev, AC.double(), 0.0)
    eps = ref.guided_eps(pred.double(), kw.get("pred_uncond"), kw.get("guidance_scale", 1.0))
    x0 = (z.double() - c.sqrt_1m_a.view(-1, 1, 1, 1) * eps) * c.inv_sqrt_a.view(-1, 1, 1, 1)
    assert float((x0.abs() - 1).abs().min()) > 1e-4
    assert 0.05 < float((x0.abs() > 1).double().mean()) < 0.95


# -- forward against the reference -----------------------------------------------------------

GUIDANCE = [None, 0.0, 1.0, 3.0]  # None: unguided
CLIPS = [None, "rederive", "diffusers"]
ETAS = [0.0, 0.5, 1.0]


def _options(scale, clip, eta, uncond):
    return dict(eta=eta, clip_x0=clip is not None, clip_rule=clip or "rederive",
                pred_uncond=None if scale is None else uncond,
                guidance_scale=1.0 if scale is None else scale)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "scale,clip,eta",
    list(itertools.product(GUIDANCE, CLIPS, ETAS)),
    ids=lambda v: "none" if v is None else str(v),
)
def test_kernel_equals_reference(dtype, layout, scale, clip, eta):
    """A given noise tensor, per-sample t (sample 1 goes to x0): 0 ulp from the reference."""
    z, cond, uncond, noise, t, t_prev = make_inputs((2, 4, 4, 4), dtype, layout)
    kw = _options(scale, clip, eta, uncond)
    assert_x0_off_the_clamp_boundary(z, cond, t, t_prev, **kw)
    got = ops.ddim_step(z, cond, t, t_prev, SCHEDULE, noise, **kw)
    assert got.dtype == dtype and is_layout(got, layout)
    assert_exact(got, z, cond, t, t_prev, noise if eta else None, "z_prev", **kw)


#: (shape, layout, tile): noise from the seed in every tile layout of kernels.common.
SEEDED_CASES = [
    ((2, 4, 4, 4), "contiguous", "FLAT4"),
    ((2, 4, 4, 4), "channels_last", "NHWC4"),
    ((3, 3, 5, 3), "contiguous", "GENERIC_NCHW"),
    ((3, 3, 5, 3), "channels_last", "GENERIC_NHWC"),
]


@pytest.mark.parametrize("shape,layout,tile", SEEDED_CASES, ids=[c[2] for c in SEEDED_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
def test_seeded_noise_is_the_other_kernels_noise(shape, layout, tile, dtype):
    """eta = 0.5, guided (s = 3) and clipped: noise from the seed equals the given-noise path
    with the normals every kernel draws for that seed (kernels.reference.philox_normal; bit
    for bit in the interpreter, within sigma * noise_bound compiled), and the reference."""
    z, cond, uncond, _, t, t_prev = make_inputs(shape, dtype, layout)
    assert common.layout_args(z, seeded=True)["LAYOUT"] == getattr(common, tile)
    kw = _options(3.0, "rederive", 0.5, uncond)
    got = ops.ddim_step(z, cond, t, t_prev, SCHEDULE, seed=SEED, **kw)
    assert got.dtype == dtype and is_layout(got, layout)
    normals, radius = ref.philox_normal(SEED, shape, device=DEVICE, with_radius=True)
    given = ops.ddim_step(z, cond, t, t_prev, SCHEDULE, with_layout(normals, layout), **kw)
    if COMPILED:
        sigma = ref.ddim_coefficients(t, t_prev, AC.double(), 0.5).sigma.view(-1, 1, 1, 1)
        slack = sigma * ref.noise_bound(radius).double()
        assert_within_ulp(got, given.double(), dtype, 1, slack=slack, what="seeded vs given")
    else:
        assert torch.equal(got, given)
    noise_err = ref.noise_bound(radius).double() if COMPILED else 0.0
    assert_exact(got, z, cond, t, t_prev, normals, "z_prev", noise_err=noise_err, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("clip", CLIPS)
def test_the_last_step_returns_x0(layout, clip):
    """t_prev = -1 everywhere: a_prev = 1, so sigma = dir = 0 and the result is x0 (clamped
    with clipping, by either rule), whatever eta and the noise: bit for bit x0 = (z -
    sqrt(1 - a_t) eps) (1 / sqrt(a_t)) in fp32 (the same correctly rounded operations)."""
    z, cond, _, noise, _, _ = make_inputs((2, 4, 4, 4), torch.float32, layout)
    t, t_prev = torch.tensor([617, 20], device=DEVICE), torch.tensor([-1, -1], device=DEVICE)
    c = ref.ddim_coefficients(t, t_prev, AC, 1.0)
    assert float(c.sigma.abs().max()) == 0.0 and float(c.dir.abs().max()) == 0.0
    x0 = (z - c.sqrt_1m_a.view(-1, 1, 1, 1) * cond) * c.inv_sqrt_a.view(-1, 1, 1, 1)
    want = x0.clamp(-1, 1) if clip else x0
    slack = U * (c.sqrt_1m_a.view(-1, 1, 1, 1) * cond).abs() * c.inv_sqrt_a.view(-1, 1, 1, 1)
    for kw in (dict(seed=SEED), dict(noise=noise, eta=1.0), dict(seed=SEED, eta=0.5)):
        got = ops.ddim_step(z, cond, t, t_prev, SCHEDULE, clip_x0=clip is not None,
                            clip_rule=clip or "rederive", **kw)  # fmt: skip
        assert_within_ulp(got, want, ulps=0, slack=slack if COMPILED else 0.0, what=str(kw))


# -- guidance ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_guidance_scale_one_is_pred_and_zero_is_uncond(layout):
    """s = 0: u + 0 (c - u) = u exactly, so the guided step is the unguided step on u, bit for
    bit; s = 1: u + (c - u) = c exactly when c - u is exact in fp32 (c, u multiples of 2^-10
    below 8 here), so it is the unguided step on c.  With noise from the seed and clipping,
    on a batch where x0 is clamped in part."""
    z, cond, uncond, _, t, t_prev = make_inputs((2, 4, 4, 4), torch.float32, layout)
    cond, uncond = ((v * 1024).round() / 1024 for v in (cond, uncond))
    assert float(torch.maximum(cond.abs(), uncond.abs()).max()) < 8
    kw = dict(seed=SEED, eta=0.5, clip_x0=True)
    for scale, plain in ((0.0, uncond), (1.0, cond)):
        guided = ops.ddim_step(z, cond, t, t_prev, SCHEDULE, pred_uncond=uncond,
                               guidance_scale=scale, **kw)  # fmt: skip
        assert torch.equal(guided, ops.ddim_step(z, plain, t, t_prev, SCHEDULE, **kw)), scale
    # and s = 3 is neither (the scale is used)
    guided = ops.ddim_step(z, cond, t, t_prev, SCHEDULE, pred_uncond=uncond, guidance_scale=3.0,
                           **kw)  # fmt: skip
    assert not torch.equal(guided, ops.ddim_step(z, cond, t, t_prev, SCHEDULE, **kw))


# -- the noise flags -------------------------------------------------------------------------


def test_noise_is_added_exactly_when_eta_is_positive(monkeypatch):
    """ADD_NOISE is eta > 0.  At eta = 0 a NaN noise tensor given to the launcher must not
    reach the result (sigma is 0 there, but 0 * NaN is NaN) and nothing is drawn from a seed;
    at eta > 0 the result minus the step with zero noise is sigma * noise."""
    launched = []
    real_launch = ddim.launch
    monkeypatch.setattr(ddim, "launch", lambda *a, **k: launched.append(k) or real_launch(*a, **k))
    z, cond, _, noise, t, t_prev = make_inputs((2, 4, 4, 4), torch.float32, "contiguous")
    nan = torch.full_like(noise, float("nan"))
    quiet = ddim.ddim_step_triton(z, cond, t, t_prev, AC, 0.0, noise=nan)
    assert bool(torch.isfinite(quiet).all())
    assert torch.equal(quiet, ops.ddim_step(z, cond, t, t_prev, SCHEDULE, seed=SEED))
    assert not any(k["ADD_NOISE"] or k["NOISE_FROM_SEED"] or k["seeded"] for k in launched)
    launched.clear()
    for eta in (0.5, 1.0):
        noisy = ddim.ddim_step_triton(z, cond, t, t_prev, AC, eta, noise=noise)
        base = ddim.ddim_step_triton(z, cond, t, t_prev, AC, eta, noise=torch.zeros_like(noise))
        sigma = ref.ddim_coefficients(t, t_prev, AC.double(), eta).sigma.view(-1, 1, 1, 1)
        assert float(sigma[0]) > 0.1 and float(sigma[1]) == 0.0  # sample 1 goes to x0
        # noisy = fl(base + fl(sigma noise)): within 2 roundings of the float64 value
        err = (noisy.double() - base.double() - sigma * noise.double()).abs()
        assert bool((err <= 2 * U * (noisy.double().abs() + (sigma * noise).abs())).all()), eta
    assert all(k["ADD_NOISE"] and not k["NOISE_FROM_SEED"] for k in launched)


def test_seeded_noise_statistics():
    """eta = 1, noise from the seed: (result - the step with zero noise) / sigma over 16384
    elements has mean 0, variance 1 and 68.27% of its mass within 1 (6 standard errors:
    a correct generator fails with probability ~1e-9), per-sample sigma included (t
    differs per sample), and the next seed's draw is uncorrelated with it."""
    B, shape = 16, (16, 4, 16, 16)
    gen = torch.Generator().manual_seed(3)
    z, pred = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2))
    t = torch.arange(B, device=DEVICE) * 60 + 50
    t_prev = t - 37
    sigma = ref.ddim_coefficients(t, t_prev, AC.double(), 1.0).sigma.view(-1, 1, 1, 1)
    base = ops.ddim_step(z, pred, t, t_prev, SCHEDULE, torch.zeros_like(z), eta=1.0).double()

    def draw(seed):
        return (ops.ddim_step(z, pred, t, t_prev, SCHEDULE, seed=seed, eta=1.0) - base) / sigma

    r = draw(SEED).cpu()
    N = r.numel()
    assert abs(float(r.mean())) < 6 / math.sqrt(N)
    assert abs(float(r.var()) - 1) < 6 * math.sqrt(2 / N)  # chi-square: Var(s^2) = 2 / N
    p = 0.682689492
    assert abs(float((r.abs() < 1).double().mean()) - p) < 6 * math.sqrt(p * (1 - p) / N)
    per_sample = r.reshape(B, -1).var(dim=1)  # each sample's own sigma
    assert bool(((per_sample - 1).abs() < 6 * math.sqrt(2 / r[0].numel())).all())
    nxt = draw(SEED + 1).cpu().flatten()
    corr = float(torch.corrcoef(torch.stack([r.flatten(), nxt]))[0, 1])
    assert abs(corr) < 6 / math.sqrt(N)


# -- out= ---------------------------------------------------------------------------------


def test_out_in_place_and_in_another_layout():
    """out=z (the sampler's static buffer) and an out of another layout give the result."""
    z, cond, uncond, _, t, t_prev = make_inputs((2, 4, 4, 4), torch.float32, "channels_last")
    kw = dict(seed=SEED, eta=1.0, clip_x0=True, pred_uncond=uncond, guidance_scale=2.0)
    want = ops.ddim_step(z, cond, t, t_prev, SCHEDULE, **kw)
    buf = z.clone()
    assert ops.ddim_step(buf, cond, t, t_prev, SCHEDULE, out=buf, **kw) is buf
    assert torch.equal(buf, want) and is_layout(buf, "channels_last")
    other = torch.empty(z.shape, device=DEVICE)  # contiguous
    assert ops.ddim_step(z, cond, t, t_prev, SCHEDULE, out=other, **kw) is other
    assert torch.equal(other, want)


# -- gradients -----------------------------------------------------------------------------

#: fp32 roundings, k, between the op's backward and autograd through the reference, relative
#: to the magnitudes in ``_grad_magnitudes``: the op takes g_x0 (1, 2 with the rederived
#: clamped value), * 1 / sqrt(a_t), g dir, * sqrt(1 - a_t), the difference, * s (6); autograd
#: takes the same products in its own order, accumulating the clamp's and the rederived
#: term's contributions and 1 + (-s) for uncond (8).  Measured: at most 1.3.
GRAD_ROUNDINGS = 14


def _grad_magnitudes(t, t_prev, eta, g, scale):
    """Per gradient, the sum of |terms| its fp32 computation adds (see GRAD_ROUNDINGS)."""
    c = ref.ddim_coefficients(t, t_prev, AC.double(), eta)
    inv, s1, sp, dir_coef, sigma, back = (v.view(-1, 1, 1, 1) for v in c)
    g = g.double().abs()
    m_z = g * (sp + dir_coef * back) * inv
    m_eps = g * dir_coef + m_z * s1
    s = 1.0 if scale is None else scale
    return dict(z=m_z, cond=abs(s) * m_eps, uncond=(1 + 2 * abs(s)) * m_eps, noise=g * sigma)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("scale", [None, 3.0])
def test_gradients_match_autograd_through_the_reference(monkeypatch, clip, scale):
    """d/d z, pred, pred_uncond and noise of the fused op (eta = 0.5, per-sample t, x0 partly
    clamped) against torch.autograd through the reference: in fp32 (the same per-sample
    coefficients, ``ref.ddim_coefficients``), within GRAD_ROUNDINGS fp32 roundings; in float64
    (coefficients computed in float64 from the same table), within 2e-6 of the magnitudes
    (the op's fp32 coefficients err by a few ulps, dir by more where 1 - a_prev - sigma^2
    cancels; measured: 3.3e-7)."""
    z, cond, uncond, noise, t, t_prev = make_inputs((2, 4, 4, 4), torch.float32, "contiguous")
    dout = torch.randn(z.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    names = ["z", "cond", "noise"] + ([] if scale is None else ["uncond"])
    values = dict(z=z, cond=cond, uncond=uncond, noise=noise)
    kw = dict(eta=0.5, clip_x0=clip is not None, clip_rule=clip or "rederive")
    if clip:
        assert_x0_off_the_clamp_boundary(z, cond, t, t_prev)

    def grads(backend, dtype):
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
        leaves = {n: values[n].detach().to(dtype).requires_grad_() for n in names}
        guided = {} if scale is None else dict(pred_uncond=leaves["uncond"], guidance_scale=scale)
        out = ops.ddim_step(leaves["z"], leaves["cond"], t, t_prev, SCHEDULE, leaves["noise"],
                            **kw, **guided)  # fmt: skip
        out.backward(dout.to(dtype))
        return {n: v.grad for n, v in leaves.items()}

    got = grads("triton", torch.float32)
    want32 = grads("reference", torch.float32)
    want64 = grads("reference", torch.float64)
    magnitude = _grad_magnitudes(t, t_prev, 0.5, dout, scale)
    for name in names:
        slack = GRAD_ROUNDINGS * U * magnitude[name]
        assert got[name].dtype == torch.float32
        assert_within_ulp(got[name], want32[name], ulps=0, slack=slack, what=f"d {name}")
        err = (got[name].double() - want64[name]).abs()
        assert bool((err <= 2e-6 * magnitude[name]).all()), (name, float(err.max()))


def test_backward_of_a_16_bit_step_is_the_fp32_one_rounded():
    """A bf16 step's gradients (bf16) are the fp32 backward's values rounded: the backward
    computes in fp32 whatever the dtype and rounds once."""
    z, cond, _, noise, t, t_prev = make_inputs((2, 4, 4, 4), torch.bfloat16, "channels_last")
    dout = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    dout = with_layout(dout.to(DEVICE, torch.bfloat16), "channels_last")

    def grads(dtype):
        zs, ps = (v.detach().to(dtype).requires_grad_() for v in (z, cond))
        ops.ddim_step(zs, ps, t, t_prev, SCHEDULE, noise.to(dtype), eta=1.0,
                      clip_x0=True).backward(dout.to(dtype))  # fmt: skip
        return zs.grad, ps.grad

    for got, fp32 in zip(grads(torch.bfloat16), grads(torch.float32), strict=True):
        assert got.dtype == torch.bfloat16 and is_layout(got, "channels_last")
        assert_within_ulp(got, fp32, torch.bfloat16, EXACT[torch.bfloat16]["fp32_op"])


def test_reference_square_roots_are_correctly_rounded():
    """ddim_coefficients' square roots are IEEE's (numpy's np.sqrt, like the kernel's
    tl.sqrt_rn) on every CPU: torch.sqrt's AVX2 float32 kernel is 1 ulp off for about one
    value in five, which broke the 0-ulp comparisons above on AVX2-only machines."""
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 0.999 + 1e-4
    assert np.array_equal(ref.sqrt_rn(x).numpy(), np.sqrt(x.numpy()))
    ac = AC.cpu()
    t = torch.arange(1, SCHEDULE.T)
    c = ref.ddim_coefficients(t, t - 1, ac, 0.5)
    a = ac.numpy()
    assert np.array_equal(c.sqrt_a_prev.numpy(), np.sqrt(a[:-1]))
    assert np.array_equal(c.sqrt_1m_a.numpy(), np.sqrt(np.float32(1) - a[1:]))
