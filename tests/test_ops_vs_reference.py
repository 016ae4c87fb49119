"""Each Triton kernel (under the interpreter on CPU) against its torch reference.

q_sample and reverse_step perform the same fp32 operations in the same order on both backends
and round once to the output dtype: their results must be equal in every dtype
(helpers.EXACT["same_order"]; compiled, within helpers.fma_slack, as FMA contraction may skip
a product's rounding).  The
loss and gradients agree to ~1e-6 relative (reduction order).  Every shape, dtype and layout
goes through the public ops in fastdiff.ops with FASTDIFF_BACKEND forced to each backend in
turn; the interpreter's fp32 -> bf16 truncation is patched to round to nearest even, as GPUs
do (helpers.interpreter_rounds_bf16).  tests/test_exact_16bit.py holds every 16-bit output
and gradient to float64 references.
"""

import itertools
import zlib

import pytest
import torch
from helpers import (
    DEVICE,
    EXACT,
    SHAPES,
    TOLERANCE,
    assert_within_ulp,
    fma_slack,
    interpreter_rounds_bf16,
    is_layout,
    with_layout,
)

from fastdiff import NoiseSchedule, ops
from fastdiff.kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last"]
SCHEDULE = NoiseSchedule.linear(1000).to(DEVICE)


@pytest.fixture(autouse=True)
def _bf16_rounds_to_nearest(monkeypatch):
    interpreter_rounds_bf16(monkeypatch)


def assert_same_result(got, want, t, *terms, slack=0.0):
    """Same fp32 operations, one rounding to the dtype on both backends: equal (EXACT).
    ``terms`` (table name, tensor): the products a[t] * x summed (fma_slack, compiled)."""
    products = [SCHEDULE.table(name)[t].view(-1, 1, 1, 1) * v.float() for name, v in terms]
    slack = slack + fma_slack(*products)
    assert_within_ulp(got, want, want.dtype, EXACT[want.dtype]["same_order"], slack=slack)


def q_terms(x, noise):
    return ("sqrt_alphas_cumprod", x), ("sqrt_one_minus_alphas_cumprod", noise)


def reverse_terms(z, pred, noise, variance="beta"):
    sigma = "sigma_beta" if variance == "beta" else "sigma_posterior"
    return ("reverse_coef_z", z), ("reverse_coef_eps", pred), (sigma, noise)


def both_backends(monkeypatch, fn):
    """(triton result, reference result) of fn()."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    got = fn()
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    return got, fn()


def inputs(shape, dtype, layout, n=2):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, layout)).encode()))
    tensors = [
        with_layout(torch.randn(shape, generator=gen).to(DEVICE, dtype), layout) for _ in range(n)
    ]
    t = torch.randint(0, SCHEDULE.T, (shape[0],), generator=gen)
    t[0] = 0  # always exercise the final, noise-free step
    return tensors, t.to(DEVICE)


@pytest.mark.parametrize("shape,dtype,layout", list(itertools.product(SHAPES, DTYPES, LAYOUTS)))
def test_q_sample_explicit_noise(monkeypatch, shape, dtype, layout):
    (x, noise), t = inputs(shape, dtype, layout)
    got, want = both_backends(monkeypatch, lambda: ops.q_sample(x, t, SCHEDULE, noise))
    assert got.dtype == dtype and is_layout(got, layout)
    assert_same_result(got, want, t, *q_terms(x, noise))


@pytest.mark.parametrize("shape,dtype,layout", list(itertools.product(SHAPES, DTYPES, LAYOUTS)))
def test_noise_loss_explicit_noise(monkeypatch, shape, dtype, layout):
    (pred, noise), t = inputs(shape, dtype, layout)
    weights = torch.rand(shape[0], device=DEVICE)
    for reduction, w in [("mean", None), ("none", None), ("mean", weights), ("none", weights)]:
        got, want = both_backends(
            monkeypatch,
            lambda: ops.noise_loss(pred, t, noise=noise, weights=w, reduction=reduction),  # noqa: B023
        )
        # Both reduce fp32 squares; only the summation order differs.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,dtype,layout", list(itertools.product(SHAPES, DTYPES, LAYOUTS)))
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_reverse_step_explicit_noise(monkeypatch, shape, dtype, layout, variance):
    (z, pred, noise), t = inputs(shape, dtype, layout, n=3)
    got, want = both_backends(
        monkeypatch, lambda: ops.reverse_step(z, pred, t, SCHEDULE, noise, variance=variance)
    )
    assert got.dtype == dtype and is_layout(got, layout)
    assert_same_result(got, want, t, *reverse_terms(z, pred, noise, variance))


def noise_slack(seed, like, coef):
    """How far a seeded result may move because of the noise alone: 0 under the interpreter
    (bit-identical to the numpy twin), coef * noise_bound(R) for compiled CUDA kernels."""
    if DEVICE.type == "cpu":
        return torch.zeros(like.shape, device=DEVICE)
    _, radius = ref.philox_normal(seed, like.shape, device=DEVICE, with_radius=True)
    return coef * ref.noise_bound(radius)


def loss_slack(seed, pred):
    """noise_slack of mean((pred - eps)^2): mean(2 |pred - eps| |d eps|)."""
    eps = ref.philox_normal(seed, pred.shape, device=DEVICE)
    return float((2 * (pred.float() - eps).abs() * noise_slack(seed, pred, 1.0)).mean())


def assert_close_within(got, want, slack, dtype, tol=None):
    """|got - want| <= slack + the dtype's rounding tolerance (helpers.TOLERANCE)."""
    tol = tol or TOLERANCE[dtype]
    want = want.float()
    allowed = slack + tol["atol"] + tol["rtol"] * want.abs()
    excess = float(((got.float() - want).abs() - allowed).max())
    assert excess <= 0.0, excess


# Shapes for every noise tile: odd sizes (GENERIC), H*W % 4 == 0 (FLAT4 / NHWC4).
@pytest.mark.parametrize("shape", [(3, 3, 7, 5), (2, 3, 4, 6)])
@pytest.mark.parametrize("dtype,layout", list(itertools.product(DTYPES, LAYOUTS)))
def test_seeded_ops_match_reference_philox(monkeypatch, shape, dtype, layout):
    """Seeded ops on both backends: the in-kernel noise is the reference's numpy Philox
    (exactly under the interpreter, within noise_bound compiled; see kernels.common)."""
    (x, pred), t = inputs(shape, dtype, layout)
    b = SCHEDULE.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    # want is already rounded: a compiled result may be one rounding away from the value the
    # reference rounded, plus the eps difference (noise_slack)
    got, want = both_backends(monkeypatch, lambda: ops.q_sample(x, t, SCHEDULE, seed=1234))
    eps = ref.philox_normal(1234, x.shape, device=DEVICE)
    assert_same_result(got, want, t, *q_terms(x, eps), slack=noise_slack(1234, x, b))
    sigma = torch.where(t == 0, 0.0, SCHEDULE.sigma_beta[t]).view(-1, 1, 1, 1)
    got, want = both_backends(monkeypatch, lambda: ops.reverse_step(x, pred, t, SCHEDULE, seed=99))
    eps = ref.philox_normal(99, x.shape, device=DEVICE)
    slack = noise_slack(99, x, sigma)
    assert_same_result(got, want, t, *reverse_terms(x, pred, eps), slack=slack)
    got, want = both_backends(monkeypatch, lambda: ops.noise_loss(pred, t, seed=5))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 + loss_slack(5, pred))


def test_mixed_layouts_and_dtypes(monkeypatch):
    """pred channels_last against contiguous z, bf16 pred against fp32 z: result follows z."""
    (z, pred, noise), t = inputs((4, 3, 6, 5), torch.float32, "contiguous", n=3)
    pred_cl = with_layout(pred, "channels_last").bfloat16()
    got, want = both_backends(monkeypatch, lambda: ops.reverse_step(z, pred_cl, t, SCHEDULE, noise))
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert_same_result(got, want, t, *reverse_terms(z, pred_cl, noise))


def test_non_dense_input_is_accepted(monkeypatch):
    (x, noise), t = inputs((3, 2, 8, 8), torch.float32, "contiguous")
    x_strided = x[:, :, ::2, ::2]
    noise = noise[:, :, :4, :4]
    got, want = both_backends(monkeypatch, lambda: ops.q_sample(x_strided, t, SCHEDULE, noise))
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_reference_autograd(monkeypatch, layout):
    (x, pred, noise), t = inputs((4, 3, 5, 7), torch.float32, layout, n=3)
    weights = torch.rand(4, device=DEVICE)

    def grads(seeded):
        xs = x.clone().requires_grad_()
        ps = pred.clone().requires_grad_()
        kw = dict(seed=11) if seeded else dict(noise=noise)
        z = ops.q_sample(xs, t, SCHEDULE, **kw)
        loss = ops.noise_loss(ps, t, weights=weights, **kw) + (z * z).sum()
        loss.backward()
        return xs.grad, ps.grad

    # Seeded, the noise moves d(z^2)/dx = 2 a z by 2 a b d eps and d loss / d pred by
    # scale d eps (noise_slack; zero under the interpreter).
    a = SCHEDULE.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    b = SCHEDULE.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    scale = (2 * weights / pred.numel()).view(-1, 1, 1, 1)
    tol = dict(rtol=1e-5, atol=1e-6)
    for seeded in (False, True):
        got, want = both_backends(monkeypatch, lambda: grads(seeded))  # noqa: B023
        slack_x = noise_slack(11, x, 2 * a * b) if seeded else 0.0
        slack_pred = noise_slack(11, pred, scale) if seeded else 0.0
        assert_close_within(got[0], want[0], slack_x, torch.float32, tol)
        assert_close_within(got[1], want[1], slack_pred, torch.float32, tol)
        assert is_layout(got[1], layout)


def test_per_sample_loss_backward(monkeypatch):
    (pred, noise), t = inputs((5, 2, 3, 4), torch.float32, "contiguous")
    upstream = torch.randn(5, device=DEVICE)

    def grad():
        p = pred.clone().requires_grad_()
        (ops.noise_loss(p, t, noise=noise, reduction="none") * upstream).sum().backward()
        return p.grad

    got, want = both_backends(monkeypatch, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reverse_step_gradients(monkeypatch):
    """d/d z, d/d pred and d/d noise (sigma[t], none at t = 0) of both backends agree."""
    (z, pred, noise), _ = inputs((3, 2, 4, 4), torch.float32, "contiguous", n=3)
    t = torch.tensor([0, 7, 999], device=DEVICE)

    def grads():
        zs, ps, ns = (v.clone().requires_grad_() for v in (z, pred, noise))
        ops.reverse_step(zs, ps, t, SCHEDULE, ns).square().sum().backward()
        return zs.grad, ps.grad, ns.grad

    got, want = both_backends(monkeypatch, grads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not want[2][0].any() and want[2][1:].abs().min() > 0


def test_reverse_step_writes_into_out(monkeypatch, triton_backend):
    (z, pred, noise), t = inputs((2, 1, 4, 4), torch.float32, "contiguous", n=3)
    want = ops.reverse_step(z, pred, t, SCHEDULE, noise)
    buf = z.clone()
    result = ops.reverse_step(buf, pred, t, SCHEDULE, noise, out=buf)
    assert result.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, want)


def test_reverse_step_into_out_of_another_layout(monkeypatch):
    """out channels_last for a contiguous z (and the reverse): out keeps its layout, values
    as the reference writes them (the kernel itself writes z's layout)."""
    for z_layout, out_layout in (("contiguous", "channels_last"), ("channels_last", "contiguous")):
        (z, pred, noise), t = inputs((2, 3, 4, 4), torch.float32, z_layout, n=3)
        want = ops.reverse_step(z, pred, t, SCHEDULE, noise)
        for backend in ("triton", "reference"):
            monkeypatch.setenv("FASTDIFF_BACKEND", backend)
            out = with_layout(torch.zeros_like(z), out_layout)
            result = ops.reverse_step(z, pred, t, SCHEDULE, noise, out=out)
            assert result.data_ptr() == out.data_ptr() and is_layout(out, out_layout)
            torch.testing.assert_close(out, want, **TOLERANCE[torch.float32])


def test_strided_t_is_read_by_index(monkeypatch):
    """t (B,) with a stride other than 1 (a slice, an expanded step): each sample still gets
    its own t[n]."""
    (x, z, pred, noise), t = inputs((3, 2, 4, 4), torch.float32, "contiguous", n=4)
    strided = torch.stack([t, torch.zeros_like(t)], dim=1)[:, 0]
    expanded = torch.tensor([7], device=DEVICE).expand(3)
    for steps in (strided, expanded):
        assert steps.stride() != (1,)
        for fn in (
            lambda s: ops.q_sample(x, s, SCHEDULE, noise),
            lambda s: ops.reverse_step(z, pred, s, SCHEDULE, noise),
        ):
            got, want = both_backends(monkeypatch, lambda: fn(steps))  # noqa: B023
            torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_seed_from_device_tensor(triton_backend):
    (x,), t = inputs((2, 3, 4, 4), torch.float32, "contiguous", n=1)
    from_int = ops.q_sample(x, t, SCHEDULE, seed=77)
    from_tensor = ops.q_sample(x, t, SCHEDULE, seed=torch.tensor([77], device=DEVICE))
    assert torch.equal(from_int, from_tensor)


def test_empty_batch(triton_backend):
    x = torch.zeros(0, 3, 4, 4, device=DEVICE)
    t = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert ops.q_sample(x, t, SCHEDULE, seed=1).shape == x.shape


def test_gradcheck_float64_reference(reference_backend):
    schedule = SCHEDULE.to("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    pred = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    noise = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen)
    t = torch.tensor([0, 500])
    w = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ops.q_sample(x, t, schedule, noise), (x,))
    assert torch.autograd.gradcheck(lambda p: ops.noise_loss(p, t, noise=noise, weights=w), (pred,))
    assert torch.autograd.gradcheck(
        lambda p: ops.noise_loss(p, t, seed=3, reduction="none"), (pred,)
    )
    assert torch.autograd.gradcheck(
        lambda z, p: ops.reverse_step(z, p, t, schedule, noise), (x, pred)
    )


@pytest.mark.parametrize("batch", range(1, 10))
def test_every_batch_size_1_to_9(monkeypatch, batch):
    """All three kernels at 3x17x13 for each batch size 1..9 (fp32, channels_last)."""
    (x, pred, noise), t = inputs((batch, 3, 17, 13), torch.float32, "channels_last", n=3)
    tol = TOLERANCE[torch.float32]
    got, want = both_backends(monkeypatch, lambda: ops.q_sample(x, t, SCHEDULE, noise))
    torch.testing.assert_close(got, want, **tol)
    got, want = both_backends(monkeypatch, lambda: ops.reverse_step(x, pred, t, SCHEDULE, noise))
    torch.testing.assert_close(got, want, **tol)
    got, want = both_backends(monkeypatch, lambda: ops.noise_loss(pred, t, seed=batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 + loss_slack(batch, pred))
