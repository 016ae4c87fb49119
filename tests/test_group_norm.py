"""The fused NHWC GroupNorm (+ SiLU) kernels against torch's GroupNorm then SiLU.

Triton runs under the interpreter on CPU tensors (compiled on CUDA).  Forward and every
gradient (x, weight, bias) are compared with autograd through F.group_norm + F.silu computed
in fp32 from the same inputs.  fp32 agrees to ~1e-5 (reduction order); a bf16/fp16 output
must be the rounding of a value within that fp32 tolerance (0 ulp beyond it,
helpers.assert_within_ulp), with the interpreter's fp32 -> bf16 truncation patched to round
to nearest even as GPUs do.  tests/test_exact_16bit.py holds the kernels to float64.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_within_ulp, interpreter_rounds_bf16

from fastdiff import UNet, ops
from fastdiff.kernels import group_norm as gn
from fastdiff.unet import GroupNormSiLU

pytest.importorskip("triton")

#: fp32 results against torch's fp32 GroupNorm (another summation order); 16-bit results are
#: the rounding of a value within this of torch's fp32 result.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _bf16_rounds_to_nearest(monkeypatch):
    interpreter_rounds_bf16(monkeypatch)


def assert_rounds_near(got, want, tol=TOL):
    """got (any dtype) is the correct rounding of a value within tol of want (fp32)."""
    slack = tol["atol"] + tol["rtol"] * want.double().abs()
    assert_within_ulp(got, want, got.dtype, 0, slack=slack)


#: (N, C, H, W, groups): odd sizes, 1 group, C groups, groups of 3 and 12 channels.
CASES = [
    (2, 6, 5, 3, 1),
    (3, 6, 3, 7, 6),
    (1, 12, 4, 5, 4),
    (2, 24, 3, 3, 2),
    (1, 40, 2, 3, 10),
]


def make(N, C, H, W, dtype, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g) * 1.5 + offset).to(DEVICE, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(DEVICE)
    b = (0.3 * torch.randn(C, generator=g)).to(DEVICE)
    dout = torch.randn(N, C, H, W, generator=g).to(DEVICE, dtype)
    return x, w, b, dout.contiguous(memory_format=torch.channels_last)


def reference(x, w, b, groups, silu, dout, eps=1e-5):
    """fp32 forward and autograd gradients of F.group_norm (+ F.silu)."""
    xs, ws, bs = (v.detach().float().requires_grad_() for v in (x, w, b))
    y = F.group_norm(xs, groups, ws, bs, eps)
    y = F.silu(y) if silu else y
    y.backward(dout.float())
    return y.detach(), xs.grad, ws.grad, bs.grad


def fused(x, w, b, groups, silu, dout, eps=1e-5):
    xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
    y = ops.group_norm_silu(xs, groups, ws, bs, eps, silu)
    y.backward(dout)
    return y.detach(), xs.grad, ws.grad, bs.grad


@pytest.mark.parametrize(
    "case,dtype,silu",
    [
        (c, d, s)
        for (c, d), s in itertools.product(
            itertools.product(CASES, [torch.float32, torch.bfloat16, torch.float16]), [True]
        )
    ]
    + [(c, torch.float32, False) for c in CASES[:3]],
)
def test_forward_and_gradients_match_torch(triton_backend, case, dtype, silu):
    N, C, H, W, groups = case
    x, w, b, dout = make(N, C, H, W, dtype)
    assert ops.group_norm_backend(x) == "triton"
    got = fused(x, w, b, groups, silu, dout)
    want = reference(x, w, b, groups, silu, dout)
    y, dx, dw, db = got
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=torch.channels_last)
    assert dw.dtype == db.dtype == torch.float32
    assert_rounds_near(y, want[0])
    assert_rounds_near(dx, want[1])
    # weight / bias gradients are fp32 sums over N*H*W terms computed from the same inputs.
    scale = 1.0 + float(want[2].abs().max())
    torch.testing.assert_close(dw, want[2], rtol=1e-4, atol=1e-5 * scale * N * H * W)
    torch.testing.assert_close(db, want[3], rtol=1e-4, atol=1e-5 * scale * N * H * W)


def modulation(N, C, seed=5):
    """(scale, shift), (N, C) each: scale-shift conditioning's per-sample modulation."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(N, C, generator=g)).to(DEVICE), torch.randn(N, C, generator=g).to(
        DEVICE
    )


@pytest.mark.parametrize(
    "case,dtype", list(itertools.product(CASES[:3], [torch.float32, torch.bfloat16]))
)
def test_scale_shift_matches_torch(triton_backend, case, dtype):
    """silu(GroupNorm(x) (1 + scale) + shift): the kernels take the per-sample (N, C) affine
    weight (1 + scale), bias (1 + scale) + shift; output and every gradient (x, weight, bias,
    scale, shift) against autograd through torch's fp32 GroupNorm and the modulation."""
    N, C, H, W, groups = case
    x, w, b, dout = make(N, C, H, W, dtype)
    scale, shift = modulation(N, C)
    leaves = [v.detach().float().requires_grad_() for v in (x, w, b, scale, shift)]
    xs, ws, bs, ss, hs = leaves
    want = F.silu(
        F.group_norm(xs, groups, ws, bs, 1e-5) * (1 + ss[..., None, None]) + hs[..., None, None]
    )
    want.backward(dout.float())
    mine = [v.detach().clone().requires_grad_() for v in (x, w, b, scale, shift)]
    got = ops.group_norm_silu(mine[0], groups, mine[1], mine[2], scale=mine[3], shift=mine[4])
    got.backward(dout)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert_rounds_near(got, want.detach())
    assert_rounds_near(mine[0].grad, xs.grad)
    # per-channel sums over N*H*W terms; per-sample ones over H*W
    for g, r, terms in zip(mine[1:], leaves[1:], (N * H * W,) * 2 + (H * W,) * 2, strict=True):
        size = 1.0 + float(r.grad.abs().max())
        torch.testing.assert_close(g.grad, r.grad, rtol=1e-4, atol=1e-5 * size * terms)


def test_per_sample_affine_gradients_stay_per_sample(triton_backend):
    """The backward of an (N, C) affine: d weight[n, c] = sum over sample n's pixels of
    d y xhat (not summed over samples), checked on the kernel entry points directly."""
    x, w, b, dout = make(3, 8, 4, 5, torch.float32, seed=2)
    scale, shift = modulation(3, 8)
    weight = (w * (1 + scale)).contiguous()
    bias = (b * (1 + scale) + shift).contiguous()
    out, mean, rstd = gn.group_norm_fwd_triton(x, weight, bias, 2, 1e-5, False)
    _, dweight, dbias = gn.group_norm_bwd_triton(dout, x, weight, bias, mean, rstd, 2, False)
    xhat = F.group_norm(x, 2, eps=1e-5)
    torch.testing.assert_close(out, xhat * weight[..., None, None] + bias[..., None, None])
    assert dweight.shape == dbias.shape == (3, 8)
    torch.testing.assert_close(dweight, (dout * xhat).sum(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbias, dout.sum(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_strided_affine_and_modulation_are_read_in_place(triton_backend):
    """A weight that is a column of a bigger parameter (stride 2) and a transposed (C, N).t()
    scale/shift (whose fold has strides (1, N)) give the result of their dense copies."""
    x, w, b, _ = make(2, 8, 4, 4, torch.float32, seed=4)
    scale, shift = modulation(2, 8)
    w_strided = torch.stack([w, -w], dim=1)[:, 0]
    scale_t, shift_t = scale.t().contiguous().t(), shift.t().contiguous().t()
    assert w_strided.stride() == (2,) and scale_t.stride() == (1, 2)
    got = ops.group_norm_silu(x, 4, w_strided, b, scale=scale_t, shift=shift_t)
    want = F.silu(
        F.group_norm(x, 4, w, b, 1e-5) * (1 + scale[..., None, None]) + shift[..., None, None]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "weight,bias,match",
    [
        (torch.ones(8, 2)[:, 0], torch.zeros(8), "weight"),
        (torch.ones(2, 8), torch.zeros(8), "bias"),
        (torch.ones(8, 2).t(), torch.zeros(2, 8), "weight"),
    ],
)
def test_kernel_entry_points_reject_affines_they_would_misread(triton_backend, weight, bias, match):
    x, _, _, dout = make(2, 8, 3, 3, torch.float32)
    with pytest.raises(ValueError, match=match):
        gn.group_norm_fwd_triton(x, weight, bias, 2, 1e-5, True)
    mean = rstd = torch.ones(2, 2)
    with pytest.raises(ValueError, match=match):
        gn.group_norm_bwd_triton(dout, x, weight, bias, mean, rstd, 2, True)


def test_many_statistics_chunks(triton_backend, monkeypatch):
    """Small tiles force several chunks per sample with a partial last tile and chunk: the
    Chan merges across tiles and chunks give torch's statistics."""
    monkeypatch.setattr(gn, "TILE", 32)
    x, w, b, dout = make(2, 12, 5, 7, torch.float32, seed=3)
    geo = gn.geometry(x, 4)
    assert geo["BLOCK_P"] == 2 and geo["chunks"] > 2 and geo["HW"] % geo["pixels_per_chunk"]
    got = fused(x, w, b, 4, True, dout)
    want = reference(x, w, b, 4, True, dout)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_large_mean_does_not_lose_the_variance(triton_backend):
    """Per-tile mean / M2 (not sum / sum of squares): offset 1000, std 1.5 still gives the
    normalised values to ~1e-4 (sum of squares in fp32 would lose most digits)."""
    x, w, b, _ = make(2, 8, 6, 6, torch.float32, offset=1000.0, seed=1)
    got = ops.group_norm_silu(x, 2, w, b)
    want = F.silu(F.group_norm(x.double(), 2, w.double(), b.double(), 1e-5))
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)


def test_contiguous_input_takes_torch(triton_backend):
    """Contiguous (NCHW) x goes to torch's GroupNorm + SiLU, which is fast there."""
    x, w, b, _ = make(2, 6, 4, 4, torch.float32)
    x = x.contiguous()
    assert ops.group_norm_backend(x) == "reference"
    got = ops.group_norm_silu(x, 3, w, b)
    assert got.is_contiguous()
    assert torch.equal(got, F.silu(F.group_norm(x, 3, w, b, 1e-5)))


def test_no_affine_parameters(triton_backend):
    x, _, _, _ = make(2, 6, 3, 3, torch.float32)
    got = ops.group_norm_silu(x, 2, None, None, silu=False)
    torch.testing.assert_close(got, F.group_norm(x, 2, eps=1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_groups=4), "num_groups"),
        (dict(num_groups=0), "num_groups"),
        (dict(weight=torch.ones(5)), "weight"),
        (dict(bias=torch.ones(6, 1)), "bias"),
        (dict(eps=0.0), "eps"),
        (dict(silu="yes"), "silu"),
        (dict(x=torch.ones(2, 6, 3, 3, dtype=torch.int64)), "x"),
        (dict(scale=torch.zeros(2, 6)), "scale, shift"),
        (dict(scale=torch.zeros(2, 6, 1), shift=torch.zeros(2, 6)), "scale"),
        (dict(scale=torch.zeros(2, 6), shift=torch.zeros(6)), "shift"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    x, w, b, _ = make(2, 6, 3, 3, torch.float32)
    args = dict(x=x, num_groups=3, weight=w, bias=b, eps=1e-5, silu=True) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        ops.group_norm_silu(**args)


def test_custom_op_registrations(triton_backend):
    """Schema, fake (meta) implementation and autograd registration, as torch.compile needs."""
    x, w, b, _ = make(2, 6, 2, 3, torch.float32)
    args = (x.requires_grad_(), w.requires_grad_(), b, 3, 1e-5, True)
    torch.library.opcheck(
        ops._group_norm_silu_op,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    # The backward op's fake with a per-sample (N, C) affine (scale-shift): d weight and
    # d bias are (N, C) too, as the kernels return them.
    ws, bs = w.expand(2, 6).contiguous(), b.expand(2, 6).contiguous()
    _, mean, rstd = ops._group_norm_silu_op(x.detach(), ws, bs, 3, 1e-5, True)
    torch.library.opcheck(
        ops._group_norm_silu_backward_op,
        (torch.ones_like(x), x.detach(), ws, bs, mean, rstd, 3, True),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_traced_by_torch_compile(triton_backend):
    """fullgraph: the op does not break the graph (aot_eager: no C++ compiler needed)."""
    x, w, b, _ = make(2, 6, 2, 3, torch.float32)

    def f(x, w, b):
        return ops.group_norm_silu(x, 3, w, b, validate=False) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))


def test_module_keeps_group_norm_state_dict_and_reference_math():
    """GroupNormSiLU is an nn.GroupNorm (same parameter names); on the CPU default path it is
    exactly F.silu(F.group_norm(...)) (or F.group_norm alone)."""
    norm, plain = GroupNormSiLU(2, 6), torch.nn.GroupNorm(2, 6)
    assert norm.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 6, 4, 5)
    plain.load_state_dict({"weight": torch.rand(6), "bias": torch.rand(6)})
    norm.load_state_dict(plain.state_dict())
    assert torch.equal(norm(x), F.silu(plain(x)))
    bare = GroupNormSiLU(2, 6, silu=False)
    assert torch.equal(bare(x), F.group_norm(x, 2, bare.weight, bare.bias, eps=1e-5))
    keys = UNet.preset("tiny").state_dict().keys()
    assert "down.0.blocks.0.norm1.weight" in keys and "norm_out.bias" in keys


@pytest.mark.slow
@pytest.mark.parametrize("scale_shift_norm", [False, True])
def test_unet_through_the_kernels_matches_torch(monkeypatch, scale_shift_norm):
    """The tiny U-Net (channels_last), forward and backward, with every GroupNorm on the fused
    kernel vs torch's: same output and parameter gradients within fp32 rounding."""
    # TF32 convolutions (cuDNN's default) would round the norms' ~1e-7 differences to ~1e-3.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = UNet.preset("tiny", scale_shift_norm=scale_shift_norm)
    model = model.to(DEVICE).to(memory_format=torch.channels_last)
    for p in model.parameters():  # move the zero-initialised layers off zero
        p.data.add_(0.05 * torch.randn_like(p))
    z = torch.randn(2, 1, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 700], device=DEVICE)

    def run(backend):
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
        model.zero_grad()
        out = model(z, t)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    got, want = run("triton"), run("reference")
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)
