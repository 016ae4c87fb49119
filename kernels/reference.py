"""Plain-torch references for the fused ops, written straight from the formulas.

They are the CPU path of fastdiff (and what the Triton kernels are tested against).  Noise
from a seed is the kernels' noise: ``philox_normal`` re-implements kernels.common's generator
(one Philox4x32-10 call per four logical neighbours, two Box-Muller pairs) in numpy uint64 and
float32 arithmetic, with L the logical (NCHW row-major) element index; it equals the Triton
interpreter bit for bit and compiled CUDA kernels within ``noise_bound``.  Only torch and numpy
are imported here, so this module works where Triton is not installed.

Arithmetic is fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 inputs (for gradcheck);
results keep the dtype and memory layout of the first tensor argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_N_ROUNDS = 10
_NEG_2_LN2 = -1.3862943611198906  # as in kernels.common
_TWO_PI = 6.283185307179586


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y cast to x's dtype and laid out like x."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return y.to(dtype=x.dtype, memory_format=fmt)


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is a 4-D tensor laid out (n, h, w, c) in memory and not also contiguous."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _per_sample(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (B, 1, ..., 1) to broadcast against ``like``, in like's compute dtype."""
    vals = table.to(_compute_dtype(like))[t]
    return vals.view(-1, *([1] * (like.dim() - 1)))


def philox4x32_10(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 (Salmon et al. 2011, Random123's philox4x32_10) of the counter words
    c0..c3 (uint64 arrays holding uint32 values) under the 64-bit key ``seed`` (low word k0,
    high word k1).  Returns the four output words (uint64 arrays of uint32 values)."""
    mask, s32 = np.uint64(_MASK32), np.uint64(32)
    k0, k1 = int(seed) & _MASK32, (int(seed) >> 32) & _MASK32
    round_a, round_b = np.uint64(_ROUND_A), np.uint64(_ROUND_B)
    for _ in range(_N_ROUNDS):
        # 32 x 32-bit products are exact in uint64: high word = mulhi, low word = mullo.
        prod_b = c2 * round_b
        prod_a = c0 * round_a
        c0, c1, c2, c3 = (
            (prod_b >> s32) ^ c1 ^ np.uint64(k0),
            prod_b & mask,
            (prod_a >> s32) ^ c3 ^ np.uint64(k1),
            prod_a & mask,
        )
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def box_muller(a: np.ndarray, b: np.ndarray):
    """(R cos 2 pi V, R sin 2 pi V) and R, float32, from uint32 words a (radius), b (angle).

    U = a 2^-32 + 2^-33 in (0, 1], R = sqrt(max(log2(U) * -2 ln 2, 0)); V = b's top 23 bits as
    a float in [1, 2) minus 1.5, in [-0.5, 0.5).  Every step is the float32 operation that
    kernels.common.box_muller performs (the interpreter runs that code on numpy too).
    """
    u = a.astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33)
    r = np.sqrt(np.maximum(np.log2(u) * np.float32(_NEG_2_LN2), np.float32(0.0)))
    v = ((b >> np.uint64(9)) | np.uint64(0x3F800000)).astype(np.uint32).view(np.float32)
    theta = np.float32(_TWO_PI) * (v - np.float32(1.5))
    return r * np.cos(theta), r * np.sin(theta), r


def philox_normal(seed: int, shape, device=None, start: int = 0, *, with_radius=False):
    """fp32 N(0, 1) noise of ``shape``; row-major element j is the kernels' eps of logical
    index L = start + j: output L % 4 of the Philox call L // 4 (see kernels.common).

    With ``with_radius``, also returns each element's Box-Muller radius R (the length of the
    pair it was drawn with), which ``noise_bound`` takes.  Computed with numpy on the host,
    then moved to ``device``.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    first = start // 4
    g = np.arange(first, (start + n + 3) // 4, dtype=np.uint64)
    zero = np.zeros_like(g)
    w0, w1, w2, w3 = philox4x32_10(g & np.uint64(_MASK32), g >> np.uint64(32), zero, zero, seed)
    z0, z1, r01 = box_muller(w0, w1)
    z2, z3, r23 = box_muller(w2, w3)
    lo = start - 4 * first
    eps = np.stack([z0, z1, z2, z3], axis=1).reshape(-1)[lo : lo + n].reshape(shape)
    eps = torch.from_numpy(eps).to(device)
    if not with_radius:
        return eps
    radius = np.stack([r01, r01, r23, r23], axis=1).reshape(-1)[lo : lo + n].reshape(shape)
    return eps, torch.from_numpy(radius).to(device)


#: Documented worst cases that noise_bound sums (CUDA Math API, "Intrinsic functions";
#: numpy's float32 log2/sin/cos measured at <= 2.2 ulp and budgeted at 4 ulp).
_LG2_APPROX_ABS = 2.0**-22  # lg2.approx.f32 on [0.5, 2]; 2 ulp (relative 2^-22) elsewhere
_COS_APPROX_ABS = 2.0**-21.19  # cos.approx.f32 on [-pi, pi] (sin: 2^-21.41)
_SQRT_APPROX_REL = 2.0**-22  # sqrt.approx.f32, budgeted at 2 ulp
_NUMPY_REL = 4 * 2.0**-23  # numpy float32 log2 / cos / sin, 4 ulp
_ROUND = 2.0**-24  # one float32 rounding


def noise_bound(radius: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |eps(compiled CUDA kernel) - eps(philox_normal)| for the same seed.

    Both compute the same Philox words and the same U, V exactly; they differ only in log2,
    cos/sin and sqrt (hardware approximations vs numpy).  With E = -ln U = R^2 / 2:

        |dR^2|   <= 2 ln2 (LG2 max(1, E / ln2) + NUMPY E / ln2) + 2 ROUND R^2  <= a + b R^2
        |dR|     <= min(|dR^2| / R, sqrt(|dR^2|)) + R (SQRT + ROUND)
        |d eps|  <= |dR| + R (COS + NUMPY + 2 ROUND)

    which is about 3e-7 / R + 2e-6 R; this returns twice that (fp32 tensor like ``radius``):
    4e-6 R at R = 1, 2.7e-5 at the largest radius (6.8), 7e-5 at R = 0.01.
    """
    r = radius.double().clamp(min=1e-30)
    a = 2 * math.log(2) * _LG2_APPROX_ABS
    b = _LG2_APPROX_ABS + _NUMPY_REL + 2 * _ROUND
    d_r2 = a + b * r * r
    d_r = torch.minimum(d_r2 / r, d_r2.sqrt()) + r * (_SQRT_APPROX_REL + _ROUND)
    d_eps = d_r + r * (_COS_APPROX_ABS + _NUMPY_REL + 2 * _ROUND)
    return (2 * d_eps).to(torch.float32)


def reference_noise(seed: int, like: torch.Tensor) -> torch.Tensor:
    """The kernels' eps for a tensor shaped like ``like`` (logical order; layout-independent)."""
    return philox_normal(seed, like.shape, device=like.device)


def q_sample_reference(x, t, sqrt_ac, sqrt_1m_ac, noise):
    """z_t = sqrt(alpha_t) x + sqrt(1 - alpha_t) eps; x, noise (B, ...), t (B,) int."""
    cd = _compute_dtype(x)
    z = _per_sample(sqrt_ac, t, x) * x.to(cd) + _per_sample(sqrt_1m_ac, t, x) * noise.to(cd)
    return _like(z, x)


def noise_loss_reference(pred, noise, weights=None, reduction="mean"):
    """Mean over all elements of (pred - eps)^2 (or per sample, shape (B,), for "none").

    With weights (B,): per-sample losses are multiplied by weights before the mean.
    """
    cd = _compute_dtype(pred)
    sq = (pred.to(cd) - noise.to(cd)) ** 2
    per_sample = sq.reshape(sq.shape[0], -1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(cd)
    return per_sample.mean() if reduction == "mean" else per_sample


def reverse_step_reference(
    z, pred, t, coef_z, coef_eps, sigma, noise, clip=None, pred_uncond=None, guidance_scale=1.0
):
    """mu = coef_z[t] z - coef_eps[t] pred; z_{t-1} = mu + sigma[t] eps, sigma := 0 at t == 0.

    With ``pred_uncond``, pred is replaced by the guided prediction pred_uncond +
    guidance_scale (pred - pred_uncond) (``guided_eps``).

    ``clip`` = (sqrt_recip_ac, sqrt_recipm1_ac, coef_x0) tables clamps the predicted x0 to
    [-1, 1] (improved-diffusion's ``clip_denoised``): with x0 = sqrt_recip_ac[t] z -
    sqrt_recipm1_ac[t] pred = (z - sqrt(1 - a_t) pred) / sqrt(a_t), the posterior mean
    coef_x0[t] x0 + coef_z'[t] z is taken at the clamped x0, i.e.

        mu_clip = mu + coef_x0[t] (clamp(x0, -1, 1) - x0)

    (exactly mu where x0 is inside [-1, 1]).
    """
    cd = _compute_dtype(z)
    sig = torch.where(t == 0, torch.zeros_like(sigma[t]), sigma[t]).to(cd)
    sig = sig.view(-1, *([1] * (z.dim() - 1)))
    zc, pc = z.to(cd), guided_eps(pred, pred_uncond, guidance_scale).to(cd)
    mu = _per_sample(coef_z, t, z) * zc - _per_sample(coef_eps, t, z) * pc
    if clip is not None:
        sqrt_recip_ac, sqrt_recipm1_ac, coef_x0 = clip
        x0 = _per_sample(sqrt_recip_ac, t, z) * zc - _per_sample(sqrt_recipm1_ac, t, z) * pc
        mu = mu + _per_sample(coef_x0, t, z) * (x0.clamp(-1.0, 1.0) - x0)
    return _like(mu + sig * noise.to(cd), z)


#: How DDIM uses a clamped x0: "rederive" recomputes eps from it (improved-diffusion);
#: "diffusers" keeps the model's eps (DDIMScheduler's clip_sample, use_clipped_model_output=False).
CLIP_RULES = ("rederive", "diffusers")


class DDIMCoefficients(NamedTuple):
    """The per-sample scalars of one DDIM step, each (B,) (``ddim_coefficients``)."""

    inv_sqrt_a: torch.Tensor  # 1 / sqrt(a_t)
    sqrt_1m_a: torch.Tensor  # sqrt(1 - a_t)
    sqrt_a_prev: torch.Tensor  # sqrt(a_prev)
    dir: torch.Tensor  # sqrt(max(1 - a_prev - sigma^2, 0)): the direction term's weight
    sigma: torch.Tensor  # the noise's weight
    rederive: torch.Tensor  # sqrt(a_t / (1 - a_t)): d eps / d x0 at fixed z_t


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root in x's dtype, as the kernels' ``tl.sqrt_rn``.

    torch.sqrt is not that on every CPU: torch 2.13's AVX2 kernels return the neighbouring
    float32 for about one value in five (AVX-512 ones are exact).  The float64 square root of
    a float32, rounded to float32, is correctly rounded (53 >= 2 * 24 + 2 bits)."""
    if x.dtype == torch.float64:
        return torch.sqrt(x)
    return torch.sqrt(x.double()).to(x.dtype)


def ddim_coefficients(t, t_prev, alphas_cumprod, eta) -> DDIMCoefficients:
    """DDIM's per-sample scalars for steps t -> t_prev (B,) int (t_prev = -1: a_prev = 1),
    in alphas_cumprod's dtype (square roots correctly rounded, as in the kernel):

        sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        dir   = sqrt(max(1 - a_prev - sigma^2, 0))
    """
    a_t = alphas_cumprod[t]
    a_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], torch.ones_like(a_t))
    sigma = eta * sqrt_rn((1 - a_prev) / (1 - a_t)) * sqrt_rn(1 - a_t / a_prev)
    return DDIMCoefficients(
        inv_sqrt_a=1 / sqrt_rn(a_t),
        sqrt_1m_a=sqrt_rn(1 - a_t),
        sqrt_a_prev=sqrt_rn(a_prev),
        dir=sqrt_rn((1 - a_prev - sigma**2).clamp(min=0)),
        sigma=sigma,
        rederive=sqrt_rn(a_t / (1 - a_t)),
    )


def ddim_step_reference(
    z, pred, t, t_prev, alphas_cumprod, eta, noise, clip_x0=False, clip_rule="rederive",
    pred_uncond=None, guidance_scale=1.0,
):  # fmt: skip
    """DDIM (Song et al. 2021) from step t to the earlier step t_prev (-1: the clean image).

        x0     = (z_t - sqrt(1 - a_t) pred) * (1 / sqrt(a_t))
        sigma  = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        z_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise,  eps = pred

    with a = alphas_cumprod[.] and a_prev = 1 where t_prev < 0 (``ddim_coefficients``; x0
    multiplies by the reciprocal, as the kernel does: one division per sample, not per element).
    ``clip_x0`` clamps x0 to [-1, 1] before it is used; with ``clip_rule="rederive"`` eps is
    then re-derived from the clamped x0, eps = (z_t - sqrt(a_t) x0_clamped) / sqrt(1 - a_t),
    computed as pred + sqrt(a_t / (1 - a_t)) (x0 - x0_clamped) (exactly pred where nothing was
    clamped), so the step is DDIM's update for the clamped denoiser and converges as steps
    grow; with ``"diffusers"`` the predicted eps is kept, which moves z by sqrt(a_prev)
    (x0_clamped - x0) at every step whatever its size.  eta = 0: deterministic (``noise`` may
    then be None).  With ``pred_uncond``, pred is the guided pred_uncond + guidance_scale
    (pred - pred_uncond).
    """
    cd = _compute_dtype(z)
    c = ddim_coefficients(t, t_prev, alphas_cumprod.to(cd), eta)
    shape = (-1, *([1] * (z.dim() - 1)))
    zc, eps = z.to(cd), guided_eps(pred, pred_uncond, guidance_scale).to(cd)
    x0 = (zc - c.sqrt_1m_a.view(shape) * eps) * c.inv_sqrt_a.view(shape)
    if clip_x0:
        clamped = x0.clamp(-1.0, 1.0)
        if clip_rule == "rederive":
            eps = eps + c.rederive.view(shape) * (x0 - clamped)
        x0 = clamped
    out = c.sqrt_a_prev.view(shape) * x0 + c.dir.view(shape) * eps
    if noise is not None:  # None: eta = 0, nothing to add
        out = out + c.sigma.view(shape) * noise.to(cd)
    return _like(out, z)


def group_norm_silu_reference(
    x, num_groups, weight, bias, eps=1e-5, silu=True, scale=None, shift=None
):
    """GroupNorm, then (``scale``, ``shift``) y (1 + scale) + shift, then SiLU, as torch
    computes them: F.silu(F.group_norm(x, ...) * (1 + scale) + shift).

    x (N, C, ...) in any layout; weight, bias (C,) or None; scale, shift (N, C) or None (the
    per-sample modulation of scale-shift conditioning, broadcast over the spatial dims).  Run
    in x's dtype exactly as a plain nn.GroupNorm + F.silu would (so the CPU path and autocast
    behave as before); torch accumulates the statistics in fp32 for fp32/bf16/fp16.  The
    Triton kernel (kernels.group_norm) matches it within rounding for fp32 and one output
    rounding for bf16/fp16.
    """
    y = torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        spatial = (1,) * (x.dim() - 2)
        y = y * (1 + scale.reshape(*scale.shape, *spatial)) + shift.reshape(*shift.shape, *spatial)
    return torch.nn.functional.silu(y) if silu else y


def guided_eps(pred, pred_uncond=None, guidance_scale=1.0):
    """Classifier-free guidance: pred_uncond + s (pred - pred_uncond), in pred's compute dtype
    (pred itself when pred_uncond is None)."""
    cd = _compute_dtype(pred)
    if pred_uncond is None:
        return pred.to(cd)
    uncond = pred_uncond.to(cd)
    return uncond + guidance_scale * (pred.to(cd) - uncond)


def dpm_solver_step_reference(
    z, pred, step, x0_prev, coefs, clip_x0=False, pred_uncond=None, guidance_scale=1.0
):
    """One DPM-Solver++ (2M) step with the coefficient row (P, Q, A, B, C) = coefs[step]:

        eps = pred  (or pred_uncond + s (pred - pred_uncond) with classifier-free guidance)
        x0  = P z - Q eps                        (clamped to [-1, 1] with clip_x0)
        z'  = A z + B x0 + C (x0 - x0_prev)

    z, pred, pred_uncond, x0_prev (B, ...); step a 1-element int tensor; coefs (N, 5).
    Returns (z', x0): z' like z, x0 in x0_prev's dtype and z's layout (the next step's
    x0_prev).  Indexing coefs with the step tensor reads nothing on the host.
    """
    cd = _compute_dtype(z)
    row = coefs.to(cd)[step.reshape(-1)[0]]
    p, q, a, b, c = (row[i] for i in range(5))
    x0 = p * z.to(cd) - q * guided_eps(pred, pred_uncond, guidance_scale)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    out = a * z.to(cd) + b * x0 + c * (x0 - x0_prev.to(cd))
    return _like(out, z), _like(x0, z).to(x0_prev.dtype)
