"""Exact checks of every kernel output and gradient in bf16 and fp16 (and fp32), per element.

The kernels load 16-bit tensors, compute in fp32 and round once when they store.  So a 16-bit
result must be *the rounding of the fp32 result*, and the fp32 result must be the formula up to
fp32 rounding.  Each check is in units in the last place (ulp) of the result's dtype
(helpers.assert_within_ulp), with the allowed distance per dtype in helpers.EXACT:

* forward q_sample / reverse_step: against the fp32 formula written in the kernel's operation
  order, from the same inputs upcast, rounded to the dtype: equal ("same_order").
* everything else -- the loss, GroupNorm + SiLU, every gradient: against float64 formulas or
  float64 autograd of the plain torch ops (independent code), from the same inputs upcast
  (the fp32 coefficient tables included).  The result must be the correct rounding of a
  value within the op's fp32 error bound of the float64 value (``fp32_error``: k roundings
  of the magnitudes involved, k counted in each test): equal, and one ulp off only where the
  float64 value lies within that bound of a rounding tie ("float64": 0 ulp beyond it).
* each 16-bit result against the same op run in fp32 on the upcast inputs, rounded: equal
  ("fp32_op").  The 16-bit path may add nothing but the final rounding; this catches a
  16-bit-only error of any size.

Seeded noise is kernels.reference.philox_normal (bit-equal to the interpreter's; compiled CUDA
kernels are within noise_bound, which goes into the slack there).  The Triton interpreter
truncates fp32 -> bf16 where GPUs round to nearest even: every test here runs with that gap
patched (helpers.interpreter_rounds_bf16; test_interpreter_bf16_rounding checks the patch),
so bf16 is held to the same exactness as fp16.

Sizes are small for the interpreter; the shapes take every tile layout of kernels.common:
(2, 3, 5, 3) the GENERIC ones (odd sizes), (2, 2, 4, 4) FLAT4 (contiguous) and NHWC4
(channels_last) when seeded; explicit noise always takes GENERIC.  Sample 0 is at t == 0.
"""

import itertools
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    COMPILED,
    DEVICE,
    EXACT,
    U,
    assert_within_ulp,
    fma_slack,
    interpreter_rounds_bf16,
    is_layout,
    round_to,
    ulp_distance,
    with_layout,
)

from fastdiff import NoiseSchedule, ops
from fastdiff.kernels import reference as ref

pytest.importorskip("triton")

DTYPES16 = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *DTYPES16]
LAYOUTS = ["contiguous", "channels_last"]
SHAPES = [(2, 3, 5, 3), (2, 2, 4, 4)]
STEPS = [0, 600]
SEED = 1234
SCHEDULE = NoiseSchedule.linear(1000).to(DEVICE)
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _cases(dtypes=DTYPES):
    """(shape, dtype, layout) for every shape, dtype and layout, with readable ids."""
    return [
        pytest.param(s, d, lay, id=f"{'x'.join(map(str, s))}-{_NAMES[d]}-{lay}")
        for s, d, lay in itertools.product(SHAPES, dtypes, LAYOUTS)
    ]


@pytest.fixture(autouse=True)
def _backend(triton_backend, monkeypatch):
    """Triton kernels (the interpreter on CPU tensors), bf16 rounding to nearest even."""
    interpreter_rounds_bf16(monkeypatch)


def fp32_error(k, magnitude):
    """Bound on the error of k fp32 roundings in a computation whose intermediate values are
    at most ``magnitude`` (per element): k u magnitude, to first order (+0.1% for the rest)."""
    return 1.001 * k * U * magnitude


def make(shape, dtype, layout, n):
    """n tensors of N(0, 1) values representable in dtype, laid out as asked, and t = STEPS."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout, n)).encode()))
    out = [
        with_layout(torch.randn(shape, generator=gen).to(DEVICE, dtype), layout) for _ in range(n)
    ]
    return out, torch.tensor(STEPS[: shape[0]], device=DEVICE)


def per_sample(table, t, dtype=torch.float32):
    """table[t] from the fp32 table the kernels read, as (B, 1, 1, 1) in ``dtype``."""
    return SCHEDULE.table(table)[t].to(dtype).view(-1, 1, 1, 1)


def eps_of(noise_mode, like, noise):
    """(kwargs for the op, eps in fp32, bound on the compiled kernels' eps error)."""
    if noise_mode == "explicit":
        return dict(noise=noise), noise.float(), 0.0
    eps, radius = ref.philox_normal(SEED, like.shape, device=DEVICE, with_radius=True)
    # interpreter: bit-equal to the numpy twin; compiled: fast-math log2 / sin / cos
    bound = ref.noise_bound(radius).double() if COMPILED else 0.0
    return dict(seed=SEED), eps, bound


def assert_rounded_fp32_op(got, fp32_result, what, slack=0.0):
    """got equals the same op's fp32 result rounded to got's dtype (EXACT[dtype]["fp32_op"])."""
    tol = EXACT[got.dtype]["fp32_op"]
    assert_within_ulp(got, fp32_result, got.dtype, tol, slack=slack, what=f"{what} vs fp32 op")


# -- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dtype,layout", _cases())
@pytest.mark.parametrize("noise_mode", ["explicit", "seeded"])
def test_q_sample_forward(shape, dtype, layout, noise_mode):
    """z = a x + b eps, the kernel's fp32 ops in its order (a * x, b * eps, sum), then one
    rounding to dtype: equal (same_order)."""
    (x, noise), t = make(shape, dtype, layout, 2)
    kw, eps, noise_err = eps_of(noise_mode, x, noise)
    got = ops.q_sample(x, t, SCHEDULE, **kw)
    assert got.dtype == dtype and is_layout(got, layout)
    a, b = per_sample("sqrt_alphas_cumprod", t), per_sample("sqrt_one_minus_alphas_cumprod", t)
    want = a * x.float() + b * eps
    slack = b.double() * noise_err + fma_slack(a * x.float(), b * eps)
    assert_within_ulp(got, want, dtype, EXACT[dtype]["same_order"], slack=slack, what="z_t")


#: variance x clip_x0 x noise in 4 runs that hold every pair of settings (an L4 array).
REVERSE_CONFIGS = [
    ("beta", False, "explicit"),
    ("posterior", True, "explicit"),
    ("beta", True, "seeded"),
    ("posterior", False, "seeded"),
]


@pytest.mark.parametrize("shape,dtype,layout", _cases())
@pytest.mark.parametrize("variance,clip_x0,noise_mode", REVERSE_CONFIGS)
def test_reverse_step_forward(shape, dtype, layout, variance, clip_x0, noise_mode):
    """mu = cz z - ce pred (+ c0 (clamp(x0) - x0), x0 = rz z - re pred); z' = mu + sigma eps
    where t > 0 and mu where t == 0, in the kernel's operation order: equal (same_order)."""
    (z, pred, noise), t = make(shape, dtype, layout, 3)
    kw, eps, noise_err = eps_of(noise_mode, z, noise)
    got = ops.reverse_step(z, pred, t, SCHEDULE, variance=variance, clip_x0=clip_x0, **kw)
    assert got.dtype == dtype and is_layout(got, layout)
    zf, pf = z.float(), pred.float()
    products = [per_sample("reverse_coef_z", t) * zf, per_sample("reverse_coef_eps", t) * pf]
    mu = products[0] - products[1]
    if clip_x0:
        products += [per_sample("sqrt_recip_alphas_cumprod", t) * zf]
        products += [per_sample("sqrt_recipm1_alphas_cumprod", t) * pf]
        x0 = products[2] - products[3]
        products += [per_sample("posterior_mean_coef_x0", t) * (x0.clamp(-1.0, 1.0) - x0)]
        mu = mu + products[4]
        assert 0.1 < float((x0.abs() > 1).float().mean()) < 0.9, "want clamped and unclamped"
    sigma = per_sample("sigma_beta" if variance == "beta" else "sigma_posterior", t)
    last = (t == 0).view(-1, 1, 1, 1)
    want = torch.where(last, mu, mu + sigma * eps)
    slack = torch.where(last, 0.0, sigma.double() * noise_err) + fma_slack(*products, sigma * eps)
    assert_within_ulp(got, want, dtype, EXACT[dtype]["same_order"], slack=slack, what="z_{t-1}")


def loss_reference(pred, eps, weights, reduction):
    """The DDPM loss in float64: mean of (pred - eps)^2 over each sample, times the sample's
    weight, then the mean over the batch (or per sample, "none")."""
    loss = ((pred.double() - eps.double()) ** 2).flatten(1).mean(dim=1)
    if weights is not None:
        loss = loss * weights.double()
    return loss.mean() if reduction == "mean" else loss


#: The loss is fp32 whatever pred's dtype: a relative tolerance against float64.  Per element
#: the kernel rounds the difference and the square (2 u); the per-sample sum of positive terms
#: errs by at most (its longest addition chain) u relative -- a tree on GPUs, numpy's 8-way
#: unrolled pairwise sum in the interpreter, chains <= 256 / 8 + 4 for the <= 256-element
#: tiles here; then / n, * w and the batch mean (3 u).  41 u = 2.4e-6; measured <= 2e-7.
LOSS_RTOL = (2 + 36 + 3) * U


@pytest.mark.parametrize("shape,dtype,layout", _cases())
@pytest.mark.parametrize("noise_mode", ["explicit", "seeded"])
def test_noise_loss_forward(shape, dtype, layout, noise_mode):
    """The fp32 loss of a 16-bit (or fp32) pred against float64: mean and per-sample ("none")
    reductions, with and without per-sample weights (seeded: two of the four)."""
    (pred, noise), t = make(shape, dtype, layout, 2)
    kw, eps, noise_err = eps_of(noise_mode, pred, noise)
    weights = torch.tensor([0.25, 1.75], device=DEVICE)
    configs = list(itertools.product(["mean", "none"], [None, weights]))
    for reduction, w in configs if noise_mode == "explicit" else configs[1:3]:
        got = ops.noise_loss(pred, t, weights=w, reduction=reduction, **kw)
        assert got.dtype == torch.float32
        want = loss_reference(pred, eps, w, reduction)
        limit = LOSS_RTOL * want.abs()
        if COMPILED:  # eps moves (p - e)^2 to at most (|p - e| + d eps)^2
            moved = loss_reference((pred.double() - eps).abs(), -noise_err, w, reduction)
            limit = limit + moved - want
        err = (got.double() - want).abs()
        assert bool((err <= limit).all()), (reduction, w is None, float((err / want).max()))


# -- GroupNorm (+ SiLU) ----------------------------------------------------------------------

#: (N, C, H, W, groups): 3 channels in 1 group (channel padding masked) and 2 groups of 2.
GN_CASES = [(2, 3, 5, 3, 1), (2, 4, 4, 4, 2)]
#: fp32 roundings k (fp32_error) between float64 and the kernels, relative to the magnitudes
#: of gn_reference, counted along the longest chain: out -- mean / rstd (Chan merges, ~4),
#: x - mu, rstd w, the product, + b, then sigmoid (exp ~2, +1, 1 / .) and y s: 12; dx -- y
#: again (8), the dy chain dout s (1 + y (1 - s)) (5), the S1 / S2 sums (~4 here), dx's own
#: 3: 20; dweight / dbias -- dy (8 with y's part), the tile and chunk sums (~4): 12.
#: Measured (fp32, 6 shapes up to 40 channels): 1.9, 1.1, 0.9, 1.1.
GN_ROUNDINGS = dict(out=12, dx=20, dweight=12, dbias=12)


def gn_inputs(case, dtype, layout, param_dtype):
    N, C, H, W, groups = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype, layout)).encode()))
    x = (0.5 + 1.5 * torch.randn(N, C, H, W, generator=gen)).to(DEVICE, dtype)
    dout = torch.randn(N, C, H, W, generator=gen).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(C, generator=gen)).to(DEVICE, param_dtype)
    b = (0.3 * torch.randn(C, generator=gen)).to(DEVICE, param_dtype)
    return with_layout(x, layout), w, b, with_layout(dout, layout), groups


def gn_run(x, w, b, groups, silu, dout):
    """{out, dx, dweight, dbias} of ops.group_norm_silu."""
    xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
    out = ops.group_norm_silu(xs, groups, ws, bs, 1e-5, silu)
    out.backward(dout)
    return dict(out=out.detach(), dx=xs.grad, dweight=ws.grad, dbias=bs.grad)


def gn_reference(x, w, b, groups, silu, dout):
    """{name: (float64 autograd of F.group_norm (+ F.silu), the magnitude that the fp32
    error of that result scales with)} (see GN_ROUNDINGS)."""
    xs, ws, bs = (v.detach().double().contiguous().requires_grad_() for v in (x, w, b))
    y = F.group_norm(xs, groups, ws, bs, 1e-5)
    out = F.silu(y) if silu else y
    out.backward(dout.double())
    N, C = x.shape[:2]

    def grouped(v):  # (N, C, H, W) -> (N, G, Cg H W)
        return v.reshape(N, groups, -1)

    def per_group(v):  # (N, G, 1) -> (N, C, H, W)
        return v.expand(N, groups, xs[0].numel() // groups).reshape(xs.shape)

    with torch.no_grad():
        mu = grouped(xs).mean(-1, keepdim=True)
        rstd = (grouped(xs).var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
        r, xhat = per_group(rstd), (xs - per_group(mu)) * per_group(rstd)
        wc, bc = ws.abs().view(1, C, 1, 1), bs.abs().view(1, C, 1, 1)
        # y = xhat w + b; xhat errs with |xhat| and, through the mean, with rstd |mu|
        m_out = 1.1 * (wc * (xhat.abs() + r * per_group(mu.abs()) + 1) + bc)  # |silu'| <= 1.1
        # dy = dout s (1 + y (1 - s)): terms up to |dout| (1 + |y|); S1, S2 sum w dy (xhat)
        m_dy = dout.double().abs() * ((1 + y.detach().abs()) if silu else 1)
        s1 = per_group(grouped(wc * m_dy).mean(-1, keepdim=True))
        s2 = per_group(grouped(wc * m_dy * (xhat.abs() + 1)).mean(-1, keepdim=True))
        m_dx = r * (wc * m_dy * (xhat.abs() + 2) + s1 + (xhat.abs() + 1) * s2)
        m_dw = (m_dy * (xhat.abs() + 1)).sum(dim=(0, 2, 3))
        m_db = m_dy.sum(dim=(0, 2, 3))
    return dict(
        out=(out.detach(), m_out),
        dx=(xs.grad, m_dx),
        dweight=(ws.grad, m_dw),
        dbias=(bs.grad, m_db),
    )


GN_CONFIGS = [  # (silu, parameters' dtype): fp32, or x's own as when sampling in bf16
    pytest.param(True, "fp32", id="silu-fp32_params"),
    pytest.param(True, "like_x", id="silu-params_like_x"),
    pytest.param(False, "fp32", id="no_silu-fp32_params"),
]


@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_NAMES.get)
@pytest.mark.parametrize("silu,params", GN_CONFIGS)
def test_group_norm_silu_kernel(case, dtype, silu, params):
    """The fused NHWC kernels: out and dx (x's dtype), dweight and dbias (the parameters'
    dtype) against float64 autograd, and the 16-bit run against the fp32 run."""
    if params == "like_x" and dtype == torch.float32:
        pytest.skip("fp32 parameters: the silu-fp32_params case")
    param_dtype = dtype if params == "like_x" else torch.float32
    x, w, b, dout, groups = gn_inputs(case, dtype, "channels_last", param_dtype)
    assert ops.group_norm_backend(x) == "triton"
    got = gn_run(x, w, b, groups, silu, dout)
    assert got["out"].dtype == got["dx"].dtype == dtype and is_layout(got["dx"], "channels_last")
    assert got["dweight"].dtype == got["dbias"].dtype == param_dtype
    want = gn_reference(x, w, b, groups, silu, dout)
    for name, value in got.items():
        slack = fp32_error(GN_ROUNDINGS[name], want[name][1])
        tol = EXACT[value.dtype]["float64"]
        assert_within_ulp(value, want[name][0], value.dtype, tol, slack=slack, what=name)
    if dtype != torch.float32:
        # compiled, 16-bit loads may get another register layout, so another summation order
        fp32 = gn_run(*(v.float() for v in (x, w, b)), groups, silu, dout.float())
        for name, value in got.items():
            slack = fp32_error(GN_ROUNDINGS[name], want[name][1]) if COMPILED else 0.0
            assert_rounded_fp32_op(value, fp32[name], name, slack)


@pytest.mark.parametrize("dtype", DTYPES16, ids=_NAMES.get)
def test_group_norm_silu_contiguous_is_torch(dtype):
    """Contiguous x never reaches the kernel: ops.group_norm_silu is F.silu(F.group_norm(x))
    in x's dtype, bit for bit, forward and backward.  Not held to the kernels' exactness:
    torch rounds between GroupNorm and SiLU and in SiLU's backward (dx measured up to 172
    bf16 ulps from float64 on GN_CASES) -- torch's behaviour, not a fastdiff kernel's."""
    x, w, b, dout, groups = gn_inputs(GN_CASES[1], dtype, "contiguous", dtype)
    assert ops.group_norm_backend(x) == "reference"
    got = gn_run(x, w, b, groups, True, dout)
    xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
    want = F.silu(F.group_norm(xs, groups, ws, bs, 1e-5))
    want.backward(dout)
    for g, r in zip(got.values(), (want.detach(), xs.grad, ws.grad, bs.grad), strict=True):
        assert g.dtype == r.dtype and torch.equal(g, r)


# -- gradients -------------------------------------------------------------------------------

#: (reduction, weighted, upstream gradient given): explicit noise runs all, seeded the last.
LOSS_BACKWARD_CONFIGS = [("mean", False, False), ("mean", True, False), ("none", True, True)]


@pytest.mark.parametrize("shape,dtype,layout", _cases())
@pytest.mark.parametrize("noise_mode", ["explicit", "seeded"])
def test_noise_loss_backward(shape, dtype, layout, noise_mode):
    """d loss / d pred (pred's dtype and layout) against float64 autograd of the plain loss;
    d / d noise is exactly its negative.

    fp32 roundings, k = 5, relative to the result (products and quotients only; the
    difference's rounding is relative to itself): the scale 2 g w / (B n) that autograd hands
    the kernel (mean's 1 / B, * w, / n; 2 * is exact), then pred - eps and the product.
    """
    (pred, noise), t = make(shape, dtype, layout, 2)
    kw, eps, noise_err = eps_of(noise_mode, pred, noise)
    weights = torch.tensor([0.3, 1.9], device=DEVICE)
    upstream = torch.tensor([0.7, -1.3], device=DEVICE)
    configs = LOSS_BACKWARD_CONFIGS if noise_mode == "explicit" else LOSS_BACKWARD_CONFIGS[2:]
    for reduction, weighted, with_upstream in configs:
        w = weights if weighted else None
        up = upstream if with_upstream else None

        def grads(p, n, reduction=reduction, w=w, up=up):
            p = p.detach().clone().requires_grad_()
            n = n.detach().clone().requires_grad_() if n is not None else None
            args = dict(noise=n) if n is not None else dict(seed=SEED)
            loss = ops.noise_loss(p, t, weights=w, reduction=reduction, **args)
            assert loss.dtype == torch.float32
            loss.backward(up)
            return p.grad, (n.grad if n is not None else None)

        got, got_noise = grads(pred, kw.get("noise"))
        assert got.dtype == dtype and is_layout(got, layout)
        p64, e64 = pred.double().requires_grad_(), eps.double()
        loss_reference(p64, e64, w, reduction).backward(None if up is None else up.double())
        # compiled: d eps moves the gradient by |scale| d eps
        scale = 2 * (w.double() if weighted else 1.0) / pred[0].numel()
        scale = scale * (up.double().abs() if with_upstream else 1.0 / pred.shape[0])
        slack = fp32_error(5, p64.grad.abs()) + torch.as_tensor(scale).view(-1, 1, 1, 1) * noise_err
        what = f"d pred ({reduction}, weighted={weighted})"
        assert_within_ulp(got, p64.grad, dtype, EXACT[dtype]["float64"], slack=slack, what=what)
        if got_noise is not None:
            assert got_noise.dtype == dtype and torch.equal(got_noise, -got), "d noise = -d pred"
        if dtype != torch.float32:
            fp32 = grads(pred.float(), None if got_noise is None else noise.float())[0]
            assert_rounded_fp32_op(got, fp32, what)


@pytest.mark.parametrize("dtype", DTYPES16, ids=_NAMES.get)
def test_noise_loss_backward_under_autocast(dtype):
    """As in mixed-precision training: a 16-bit pred reaches the loss inside autocast; the
    loss is fp32 and d loss / d pred comes back in pred's dtype, bit-equal to the result
    outside autocast and the rounding of float64 autograd (k = 4: 1 / B, / n, pred - eps,
    the product)."""
    (pred,), t = make((2, 2, 4, 4), dtype, "channels_last", 1)
    p = pred.clone().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=dtype):
        loss = ops.noise_loss(p, t, seed=SEED)
    assert loss.dtype == torch.float32
    loss.backward()
    assert p.grad.dtype == dtype and is_layout(p.grad, "channels_last")
    plain = pred.clone().requires_grad_()
    ops.noise_loss(plain, t, seed=SEED).backward()
    assert torch.equal(p.grad, plain.grad)
    _, eps, noise_err = eps_of("seeded", pred, None)
    p64 = pred.double().requires_grad_()
    loss_reference(p64, eps, None, "mean").backward()
    slack = fp32_error(4, p64.grad.abs()) + 2 / pred.numel() * noise_err
    assert_within_ulp(p.grad, p64.grad, dtype, EXACT[dtype]["float64"], slack=slack, what="d pred")


@pytest.mark.parametrize("shape,dtype,layout", _cases())
@pytest.mark.parametrize("noise_mode", ["explicit", "seeded"])
def test_q_sample_backward(shape, dtype, layout, noise_mode):
    """d z / d x = a[t] and d z / d noise = b[t] times the upstream gradient (z's dtype): one
    fp32 product (k = 1), then the rounding to the dtype."""
    (x, noise, dout), t = make(shape, dtype, layout, 3)
    seeded = noise_mode == "seeded"

    def grads(x, noise, dout):
        xs = x.detach().clone().requires_grad_()
        ns = None if seeded else noise.detach().clone().requires_grad_()
        ops.q_sample(xs, t, SCHEDULE, ns, seed=SEED if seeded else None).backward(dout)
        return dict(dx=xs.grad) if seeded else dict(dx=xs.grad, dnoise=ns.grad)

    got = grads(x, noise, dout)
    x64, n64 = x.double().requires_grad_(), noise.double().requires_grad_()
    a = per_sample("sqrt_alphas_cumprod", t, torch.float64)
    b = per_sample("sqrt_one_minus_alphas_cumprod", t, torch.float64)
    (a * x64 + b * n64).backward(dout.double())
    for name, value in got.items():
        want = (x64 if name == "dx" else n64).grad
        assert value.dtype == dtype and is_layout(value, layout)
        slack = fp32_error(1, want.abs())
        assert_within_ulp(value, want, dtype, EXACT[dtype]["float64"], slack=slack, what=name)
    if dtype != torch.float32:
        fp32 = grads(x.float(), noise.float(), dout.float())
        for name, value in got.items():
            assert_rounded_fp32_op(value, fp32[name], name)


@pytest.mark.parametrize("shape,dtype,layout", _cases())
@pytest.mark.parametrize(
    "clip_x0,noise_mode", [(False, "explicit"), (True, "explicit"), (True, "seeded")]
)
def test_reverse_step_backward(shape, dtype, layout, clip_x0, noise_mode):
    """d z' / d z and d z' / d pred against float64 autograd of the plain step (torch.clamp
    for the clipped x0; sigma eps depends on neither).  Unclipped each is one fp32 product
    (k = 1).  Clipped, where x0 is clamped they are g (cz - c0 rz) and -g (ce - c0 re),
    computed as g cz + (-g c0) rz: three roundings of terms up to |g| (cz + c0 rz) (k = 3 of
    that sum; at t == 0 the two terms cancel, c0 rz = cz, and only this bound is meaningful)."""
    (z, pred, noise, dout), t = make(shape, dtype, layout, 4)
    kw = dict(seed=SEED) if noise_mode == "seeded" else dict(noise=noise)

    def grads(z, pred, dout):
        zs, ps = (v.detach().clone().requires_grad_() for v in (z, pred))
        ops.reverse_step(zs, ps, t, SCHEDULE, clip_x0=clip_x0, **kw).backward(dout)
        return dict(dz=zs.grad, dpred=ps.grad)

    got = grads(z, pred, dout)
    z64, p64 = (v.double().requires_grad_() for v in (z, pred))
    cz = per_sample("reverse_coef_z", t, torch.float64)
    ce = per_sample("reverse_coef_eps", t, torch.float64)
    mu = cz * z64 - ce * p64
    g = dout.double().abs()
    magnitude, k = dict(dz=g * cz, dpred=g * ce), 1
    if clip_x0:
        rz = per_sample("sqrt_recip_alphas_cumprod", t, torch.float64)
        re = per_sample("sqrt_recipm1_alphas_cumprod", t, torch.float64)
        c0 = per_sample("posterior_mean_coef_x0", t, torch.float64)
        x0 = rz * z64 - re * p64
        assert float((x0.detach().abs() - 1).abs().min()) > 1e-4, "an x0 within fp32 error of +-1"
        mu = mu + c0 * (x0.clamp(-1.0, 1.0) - x0)
        magnitude, k = dict(dz=g * (cz + c0 * rz), dpred=g * (ce + c0 * re)), 3
    mu.backward(dout.double())
    for name, want in (("dz", z64.grad), ("dpred", p64.grad)):
        value = got[name]
        assert value.dtype == dtype and is_layout(value, layout)
        slack = fp32_error(k, magnitude[name])
        assert_within_ulp(value, want, dtype, EXACT[dtype]["float64"], slack=slack, what=name)
    if dtype != torch.float32:
        fp32 = grads(z.float(), pred.float(), dout.float())
        for name, value in got.items():
            assert_rounded_fp32_op(value, fp32[name], name)


# -- the interpreter gap ---------------------------------------------------------------------


def test_interpreter_bf16_rounding():
    """The patched interpreter (autouse fixture) casts fp32 -> bf16 as torch and GPUs do: to
    nearest, ties to even, carrying into the exponent, subnormals, +-inf, NaN.  Unpatched,
    triton's interpreter truncates (1 + 2^-7 + 2^-9 -> 1 + 2^-7 rather than 1 + 2^-6)."""
    if DEVICE.type == "cuda":
        pytest.skip("compiled kernels: no interpreter in play")
    import triton.language as tl
    from triton.runtime import interpreter

    values = np.array(
        [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7 + 2**-9, 2 - 2**-9, -(2 - 2**-10), 2**-130,
         3e38, -3.4e38, np.inf, -np.inf, np.nan, 0.0, -0.0, 1.1754944e-38],
        dtype=np.float32,
    )  # fmt: skip
    handle = interpreter.TensorHandle(values, tl.float32)
    bits = interpreter.InterpreterBuilder().cast_impl(handle, tl.bfloat16).data
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert bits.dtype == np.uint16 and np.array_equal(bits, want), (bits, want)


def test_ulp_helper():
    """ulp_distance counts representable values: across +-0 and subnormals, ties to even,
    the slack interval; assert_within_ulp names the worst element."""
    bf16, fp16 = torch.bfloat16, torch.float16
    one = torch.tensor([1.0], dtype=bf16)
    assert int(ulp_distance(one, torch.tensor([1 + 2**-7]))) == 1
    assert int(ulp_distance(torch.tensor([-0.0], dtype=bf16), torch.tensor([0.0]))) == 0
    tiny = 2.0**-24  # fp16's smallest subnormal
    got = torch.tensor([tiny, -tiny, 0.0, float("nan")], dtype=fp16)
    want = torch.tensor([-tiny, 0.0, -tiny, float("nan")], dtype=torch.float64)
    assert ulp_distance(got, want).tolist() == [2, 1, 1, 0]
    assert int(ulp_distance(torch.tensor([float("nan")], dtype=fp16), torch.ones(1))) > 2**60
    # 1 + 2^-8 is a bf16 tie: even 1.0; 1 + 2^-7 only within a slack that reaches past it
    tie = torch.tensor([1 + 2**-8], dtype=torch.float64)
    assert int(ulp_distance(one, tie)) == 0
    assert int(ulp_distance(one + 2**-7, tie)) == 1
    assert int(ulp_distance(one + 2**-7, tie, slack=2.0**-20)) == 0
    # torch's float64 -> bf16 goes through fp32 (double rounding); round_to does not
    above = torch.tensor([1 + 2**-8 + 2**-40], dtype=torch.float64)
    assert float(above.to(bf16)) == 1.0 and float(round_to(above, bf16)) == 1 + 2**-7
    assert_within_ulp(one + 2**-7, tie, ulps=1)
    with pytest.raises(AssertionError, match=r"1 of 1 elements .* max distance 1 ulp at index"):
        assert_within_ulp(one + 2**-7, tie, ulps=0)
