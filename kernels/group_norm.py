"""Fused GroupNorm (+ SiLU) for channels_last (NHWC) activations, forward and backward.

    x: (N, C, H, W), memory (n, h, w, c); G groups of Cg = C / G consecutive channels;
    M = H W Cg elements per (sample, group)
    mu, var  = mean and biased variance of the group (fp32)       rstd = 1 / sqrt(var + eps)
    xhat     = (x - mu) rstd
    y        = xhat w[c] + b[c]                                    (the GroupNorm)
               or xhat w[n, c] + b[n, c] with a per-sample affine (scale-shift conditioning
               folded in by the caller: w (1 + scale), b (1 + scale) + shift)
    out      = silu(y) = y sigmoid(y)   (SILU; else out = y)       dtype and layout of x

Backward, for d out: dy = d out * silu'(y) = d out s (1 + y (1 - s)), s = sigmoid(y) (or
d out), and per (sample, group) S1 = sum w dy, S2 = sum w dy xhat:

    dx = rstd (w dy - (S1 + xhat S2) / M),   dw[c] = sum_{n,h,w} dy xhat,   db[c] = sum dy
    (per-sample affine: dw[n, c] = sum_{h,w} dy xhat, db[n, c] = sum_{h,w} dy)

Passes over memory: forward reads x twice (statistics, then normalise) and writes out once;
backward reads x and d out twice each and writes dx once.  eager torch (GroupNorm, then SiLU,
each with its own backward) moves about twice that.

Kernels, all over tiles of BLOCK_P pixels x C_PAD channels (every channel of a pixel is one
contiguous row in NHWC memory, so loads are 16-byte vectors):
    stats        per (sample, pixel chunk): per-channel mean and M2 (sum of squared deviations),
                 merged across the chunk's tiles with Chan et al.'s parallel formula (robust to
                 large means, unlike sum / sum of squares)
    combine      per sample: merges the chunks, then the channels of each group -> mu, rstd
    fwd          per tile: out = act((x - mu) rstd w + b)
    bwd_stats    per (sample, chunk): per-channel sum dy xhat, sum dy
    bwd_combine  per sample: S1, S2 per group
    bwd          per tile: dx (dw, db are the per-channel sums over samples and chunks)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import device_guard, same_layout
from .reference import is_channels_last

#: Elements of one tile (BLOCK_P x C_PAD): 16 per thread at 4 warps (the backward kernels
#: then take at most 96 registers; 4096 took 128).
TILE = 2048
#: Statistics programs to aim for (several per SM on current GPUs); chunks per sample follow.
STATS_PROGRAMS = 1024
MAX_CHUNKS = 64


@triton.jit
def _tile(n, p0, HW, C, BLOCK_P: tl.constexpr, C_PAD: tl.constexpr):
    """Offsets (BLOCK_P, C_PAD) of pixels p0.. of sample n, the mask, and the channel index."""
    p = p0 + tl.arange(0, BLOCK_P)[:, None]
    c = tl.arange(0, C_PAD)[None, :]
    offs = (n.to(tl.int64) * HW + p) * C + c
    return offs, (p < HW) & (c < C), c


@triton.jit
def _channel_params(
    n, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, Cg, G, affine_stride, C_PAD: tl.constexpr
):
    """Per-channel (1, C_PAD) fp32 weight, bias, group mean and rstd of sample n.

    affine_stride: 0 for a (C,) affine shared by all samples, C for a (N, C) one."""
    c = tl.arange(0, C_PAD)
    cm = c < C
    grp = n * G + c // Cg
    row = n * affine_stride + c
    w = tl.load(w_ptr + row, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row, mask=cm, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + grp, mask=cm, other=0.0)
    rstd = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
    return w[None, :], b[None, :], mu[None, :], rstd[None, :]


@triton.jit
def _act_grad(x, dout, w, b, mu, rstd, SILU: tl.constexpr):
    """(xhat, d y) from x and d out: the pre-activation y = xhat w + b is recomputed."""
    xhat = (x - mu) * rstd
    if SILU:
        y = xhat * w + b
        s = tl.sigmoid(y)
        return xhat, dout * s * (1.0 + y * (1.0 - s))
    return xhat, dout


@triton.jit
def group_norm_stats_kernel(
    x_ptr, part_ptr, HW, C, pixels_per_chunk, chunks,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """part[n, k, 0, c], part[n, k, 1, c] = mean and M2 of channel c over chunk k's pixels."""
    pid = tl.program_id(0)
    n = pid // chunks
    start = (pid % chunks) * pixels_per_chunk
    end = tl.minimum(start + pixels_per_chunk, HW)
    mean = tl.zeros((C_PAD,), tl.float32)
    m2 = tl.zeros((C_PAD,), tl.float32)
    count = 0.0
    for p0 in range(start, end, BLOCK_P):
        offs, mask, _ = _tile(n, p0, HW, C, BLOCK_P, C_PAD)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        nb = tl.minimum(end - p0, BLOCK_P).to(tl.float32)
        bmean = tl.sum(x, axis=0) / nb
        d = tl.where(mask, x - bmean[None, :], 0.0)
        bm2 = tl.sum(d * d, axis=0)
        delta = bmean - mean
        total = count + nb
        mean += delta * (nb / total)
        m2 += bm2 + delta * delta * (count * nb / total)
        count = total
    c = tl.arange(0, C_PAD)
    out = part_ptr + pid.to(tl.int64) * 2 * C + c
    tl.store(out, mean, mask=c < C)
    tl.store(out + C, m2, mask=c < C)


@triton.jit
def group_norm_combine_kernel(
    part_ptr, mean_ptr, rstd_ptr, HW, C, Cg, G, pixels_per_chunk, chunks, eps,
    G_PAD: tl.constexpr, CG_PAD: tl.constexpr,
):  # fmt: skip
    """mean[n, g], rstd[n, g] from the chunk partials of sample n (Chan's merge)."""
    n = tl.program_id(0)
    g = tl.arange(0, G_PAD)[:, None]
    j = tl.arange(0, CG_PAD)[None, :]
    mask = (g < G) & (j < Cg)
    ch = g * Cg + j
    mean = tl.zeros((G_PAD, CG_PAD), tl.float32)
    m2 = tl.zeros((G_PAD, CG_PAD), tl.float32)
    count = 0.0
    for k in range(0, chunks):
        row = part_ptr + (n * chunks + k).to(tl.int64) * 2 * C + ch
        mk = tl.load(row, mask=mask, other=0.0)
        m2k = tl.load(row + C, mask=mask, other=0.0)
        nk = tl.minimum(HW - k * pixels_per_chunk, pixels_per_chunk).to(tl.float32)
        delta = mk - mean
        total = count + nk
        mean += delta * (nk / total)
        m2 += m2k + delta * delta * (count * nk / total)
        count = total
    # channels -> group: equal counts (HW) per channel
    gmean = tl.sum(tl.where(mask, mean, 0.0), axis=1) / Cg
    dev = tl.where(mask, mean - gmean[:, None], 0.0)
    gm2 = tl.sum(tl.where(mask, m2, 0.0) + HW * dev * dev, axis=1)
    var = gm2 / (HW * Cg)
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    gi = tl.arange(0, G_PAD)
    tl.store(mean_ptr + n * G + gi, gmean, mask=gi < G)
    tl.store(rstd_ptr + n * G + gi, rstd, mask=gi < G)


@triton.jit
def group_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, out_ptr, HW, C, Cg, G, blocks, affine_stride,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = pid // blocks
    offs, mask, _ = _tile(n, (pid % blocks) * BLOCK_P, HW, C, BLOCK_P, C_PAD)
    w, b, mu, rstd = _channel_params(
        n, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, Cg, G, affine_stride, C_PAD
    )
    x = tl.load(x_ptr + offs, mask=mask, other=mu).to(tl.float32)  # xhat = 0 off-mask
    y = (x - mu) * (rstd * w) + b
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_bwd_stats_kernel(
    x_ptr, dout_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr,
    HW, C, Cg, G, pixels_per_chunk, chunks, affine_stride,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """part[n, k, 0, c] = sum dy xhat, part[n, k, 1, c] = sum dy over chunk k of sample n."""
    pid = tl.program_id(0)
    n = pid // chunks
    start = (pid % chunks) * pixels_per_chunk
    end = tl.minimum(start + pixels_per_chunk, HW)
    w, b, mu, rstd = _channel_params(
        n, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, Cg, G, affine_stride, C_PAD
    )
    sum_dy_xhat = tl.zeros((C_PAD,), tl.float32)
    sum_dy = tl.zeros((C_PAD,), tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs, mask, _ = _tile(n, p0, HW, C, BLOCK_P, C_PAD)
        x = tl.load(x_ptr + offs, mask=mask, other=mu).to(tl.float32)  # xhat = 0 off-mask
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dy = _act_grad(x, dout, w, b, mu, rstd, SILU)
        dy = tl.where(mask, dy, 0.0)
        sum_dy_xhat += tl.sum(dy * xhat, axis=0)
        sum_dy += tl.sum(dy, axis=0)
    c = tl.arange(0, C_PAD)
    out = part_ptr + pid.to(tl.int64) * 2 * C + c
    tl.store(out, sum_dy_xhat, mask=c < C)
    tl.store(out + C, sum_dy, mask=c < C)


@triton.jit
def group_norm_bwd_combine_kernel(
    part_ptr, w_ptr, s_ptr, C, Cg, G, chunks, affine_stride,
    G_PAD: tl.constexpr, CG_PAD: tl.constexpr,
):  # fmt: skip
    """s[n, 0, g] = S1 = sum_{c in g} w[c] sum dy, s[n, 1, g] = S2 = sum w[c] sum dy xhat."""
    n = tl.program_id(0)
    g = tl.arange(0, G_PAD)[:, None]
    j = tl.arange(0, CG_PAD)[None, :]
    mask = (g < G) & (j < Cg)
    ch = g * Cg + j
    a = tl.zeros((G_PAD, CG_PAD), tl.float32)
    b = tl.zeros((G_PAD, CG_PAD), tl.float32)
    for k in range(0, chunks):
        row = part_ptr + (n * chunks + k).to(tl.int64) * 2 * C + ch
        a += tl.load(row, mask=mask, other=0.0)
        b += tl.load(row + C, mask=mask, other=0.0)
    w = tl.load(w_ptr + n * affine_stride + ch, mask=mask, other=0.0).to(tl.float32)
    gi = tl.arange(0, G_PAD)
    tl.store(s_ptr + (n * 2) * G + gi, tl.sum(w * b, axis=1), mask=gi < G)
    tl.store(s_ptr + (n * 2 + 1) * G + gi, tl.sum(w * a, axis=1), mask=gi < G)


@triton.jit
def group_norm_bwd_kernel(
    x_ptr, dout_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, s_ptr, dx_ptr, HW, C, Cg, G, blocks,
    affine_stride,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = pid // blocks
    offs, mask, c = _tile(n, (pid % blocks) * BLOCK_P, HW, C, BLOCK_P, C_PAD)
    w, b, mu, rstd = _channel_params(
        n, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, Cg, G, affine_stride, C_PAD
    )
    grp = n * 2 * G + c // Cg
    s1 = tl.load(s_ptr + grp, mask=c < C, other=0.0)
    s2 = tl.load(s_ptr + grp + G, mask=c < C, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=mu).to(tl.float32)  # xhat = 0 off-mask
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat, dy = _act_grad(x, dout, w, b, mu, rstd, SILU)
    # Not (HW * Cg).to(...): an int argument equal to 1 is specialised to a constexpr,
    # and with HW == Cg == 1 the product is a plain int without .to.
    inv_m = 1.0 / (HW * Cg)
    dx = rstd * (w * dy - (s1 + xhat * s2) * inv_m)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# -- launchers -------------------------------------------------------------------------------


def geometry(x: torch.Tensor, num_groups: int) -> dict:
    """Launch geometry for a channels_last x (N, C, H, W): tile, chunks, blocks, pads."""
    N, C, H, W = x.shape
    HW = H * W
    c_pad = triton.next_power_of_2(C)
    block_p = max(1, min(TILE // c_pad, triton.next_power_of_2(HW)))
    tiles = triton.cdiv(HW, block_p)
    chunks = max(1, min(MAX_CHUNKS, tiles, triton.cdiv(STATS_PROGRAMS, max(N, 1))))
    pixels_per_chunk = triton.cdiv(tiles, chunks) * block_p
    cg = C // num_groups
    return {
        "N": N, "C": C, "HW": HW, "G": num_groups, "Cg": cg,
        "C_PAD": c_pad, "BLOCK_P": block_p, "blocks": tiles,
        "chunks": triton.cdiv(HW, pixels_per_chunk), "pixels_per_chunk": pixels_per_chunk,
        "G_PAD": triton.next_power_of_2(num_groups), "CG_PAD": triton.next_power_of_2(cg),
        "num_warps": 4 if c_pad * block_p >= 1024 else 1,
    }  # fmt: skip


def affine_row_stride(weight: torch.Tensor) -> int:
    """Elements between samples' rows of the affine: 0 for (C,), C for a per-sample (N, C)."""
    return weight.shape[-1] if weight.dim() == 2 else 0


def _check_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """The kernels read weight and bias at n * affine_row_stride + c: both must be dense
    and of one shape, (C,) or (N, C); anything else would be read out of place."""
    N, C = x.shape[:2]
    for name, p in (("weight", weight), ("bias", bias)):
        if p.shape not in ((C,), (N, C)) or p.shape != weight.shape or not p.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous ({C},) or ({N}, {C}) tensor shaped like weight,"
                f" got shape {tuple(p.shape)} with strides {p.stride()}"
            )


def group_norm_fwd_triton(x, weight, bias, num_groups: int, eps: float, silu: bool):
    """(out, mean, rstd): out like x (channels_last, x's dtype); mean, rstd fp32 (N, G).

    x: channels_last (N, C, H, W) fp32/bf16/fp16; weight, bias: contiguous (C,) or (N, C)
    (per sample), any float dtype.
    """
    if not is_channels_last(x):
        raise ValueError("x: the GroupNorm kernel takes channels_last (NHWC) tensors")
    _check_affine(x, weight, bias)
    geo = geometry(x, num_groups)
    N, G = geo["N"], geo["G"]
    out = torch.empty_like(x)
    mean = torch.empty((N, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return out, mean.fill_(0.0), rstd.fill_(0.0)
    part = torch.empty((N, geo["chunks"], 2, geo["C"]), dtype=torch.float32, device=x.device)
    with device_guard(x.device):
        _launch_fwd(x, weight, bias, mean, rstd, out, part, geo, eps, silu)
    return out, mean, rstd


def _launch_fwd(x, weight, bias, mean, rstd, out, part, geo: dict, eps: float, silu: bool):
    N, G, warps = geo["N"], geo["G"], geo["num_warps"]
    group_norm_stats_kernel[(N * geo["chunks"],)](
        x, part, geo["HW"], geo["C"], geo["pixels_per_chunk"], geo["chunks"],
        C_PAD=geo["C_PAD"], BLOCK_P=geo["BLOCK_P"], num_warps=warps,
    )  # fmt: skip
    group_norm_combine_kernel[(N,)](
        part, mean, rstd, geo["HW"], geo["C"], geo["Cg"], G, geo["pixels_per_chunk"],
        geo["chunks"], float(eps), G_PAD=geo["G_PAD"], CG_PAD=geo["CG_PAD"], num_warps=4,
    )  # fmt: skip
    group_norm_fwd_kernel[(N * geo["blocks"],)](
        x, weight, bias, mean, rstd, out, geo["HW"], geo["C"], geo["Cg"], G, geo["blocks"],
        affine_row_stride(weight),
        C_PAD=geo["C_PAD"], BLOCK_P=geo["BLOCK_P"], SILU=bool(silu), num_warps=warps,
    )  # fmt: skip


def group_norm_bwd_triton(grad, x, weight, bias, mean, rstd, num_groups: int, silu: bool):
    """(dx, dweight, dbias) for d out = grad; dx like x, dweight/dbias like weight/bias
    ((C,): summed over samples; (N, C): per sample)."""
    _check_affine(x, weight, bias)
    geo = geometry(x, num_groups)
    N, G = geo["N"], geo["G"]
    grad = same_layout(grad, x)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(bias)
    part = torch.empty((N, geo["chunks"], 2, geo["C"]), dtype=torch.float32, device=x.device)
    s = torch.empty((N, 2, G), dtype=torch.float32, device=x.device)
    with device_guard(x.device):
        _launch_bwd(grad, x, weight, bias, mean, rstd, dx, part, s, geo, silu)
    # over chunks (and samples for a shared affine): d weight = sum dy xhat, d bias = sum dy
    dims = (1,) if weight.dim() == 2 else (0, 1)
    dweight = part[:, :, 0].sum(dim=dims).to(weight.dtype)
    dbias = part[:, :, 1].sum(dim=dims).to(bias.dtype)
    return dx, dweight, dbias


def _launch_bwd(grad, x, weight, bias, mean, rstd, dx, part, s, geo: dict, silu: bool):
    N, G, warps = geo["N"], geo["G"], geo["num_warps"]
    stride = affine_row_stride(weight)
    group_norm_bwd_stats_kernel[(N * geo["chunks"],)](
        x, grad, weight, bias, mean, rstd, part, geo["HW"], geo["C"], geo["Cg"], G,
        geo["pixels_per_chunk"], geo["chunks"], stride,
        C_PAD=geo["C_PAD"], BLOCK_P=geo["BLOCK_P"], SILU=bool(silu), num_warps=warps,
    )  # fmt: skip
    group_norm_bwd_combine_kernel[(N,)](
        part, weight, s, geo["C"], geo["Cg"], G, geo["chunks"], stride,
        G_PAD=geo["G_PAD"], CG_PAD=geo["CG_PAD"], num_warps=4,
    )  # fmt: skip
    group_norm_bwd_kernel[(N * geo["blocks"],)](
        x, grad, weight, bias, mean, rstd, s, dx, geo["HW"], geo["C"], geo["Cg"], G,
        geo["blocks"], stride, C_PAD=geo["C_PAD"], BLOCK_P=geo["BLOCK_P"], SILU=bool(silu),
        num_warps=warps,
    )  # fmt: skip


def _aot_cases():
    """(kernel, constexprs, num_warps, scalar types) per kernel name, for tests/aot_compile.py:
    the cifar10 preset's widest GroupNorm (C = 384 = 32 groups of 12, 16x16, batch 128)."""
    like = torch.empty((128, 384, 16, 16), device="meta").contiguous(
        memory_format=torch.channels_last
    )
    geo = geometry(like, 32)
    tile = {"C_PAD": geo["C_PAD"], "BLOCK_P": geo["BLOCK_P"]}
    group = {"G_PAD": geo["G_PAD"], "CG_PAD": geo["CG_PAD"]}
    warps = geo["num_warps"]
    return {
        "group_norm_stats": (group_norm_stats_kernel, tile, warps, {}),
        "group_norm_combine": (group_norm_combine_kernel, group, 4, {"eps": "fp32"}),
        "group_norm_fwd": (group_norm_fwd_kernel, {**tile, "SILU": True}, warps, {}),
        "group_norm_bwd_stats": (group_norm_bwd_stats_kernel, {**tile, "SILU": True}, warps, {}),
        "group_norm_bwd_combine": (group_norm_bwd_combine_kernel, group, 4, {}),
        "group_norm_bwd": (group_norm_bwd_kernel, {**tile, "SILU": True}, warps, {}),
    }


#: Kernels whose pointers carry the activation dtype; the combine kernels see fp32 only.
DTYPE_FREE = ("group_norm_combine", "group_norm_bwd_combine")


def aot_case(name: str, dtype: torch.dtype):
    """For tests/aot_compile.py: (kernel, constexprs, num_warps, scalar types) of kernel
    ``name`` for activations of ``dtype``, or None where the kernel does not depend on it."""
    if name in DTYPE_FREE and dtype != torch.float32:
        return None
    return _aot_cases()[name]


GROUP_NORM_KERNELS = (
    "group_norm_stats", "group_norm_combine", "group_norm_fwd",
    "group_norm_bwd_stats", "group_norm_bwd_combine", "group_norm_bwd",
)  # fmt: skip
