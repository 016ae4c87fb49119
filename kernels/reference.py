"""Plain-torch references for the fused ops, written straight from the formulas.

They are the CPU path of fastdiff (and what the Triton kernels are tested against).  Noise
from a seed is the kernels' noise exactly: ``philox_normal`` re-implements
``tl.randn(seed, L)`` (Philox-4x32-10, Box-Muller, Triton's uint -> float mapping) in uint64
numpy arithmetic, with L the logical (NCHW row-major) element index.  Only torch and numpy are
imported here, so this module works where Triton is not installed.

Arithmetic is fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 inputs (for gradcheck);
results keep the dtype and memory layout of the first tensor argument.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_N_ROUNDS = 10


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


def philox_normal(seed: int, shape, device=None, start: int = 0) -> torch.Tensor:
    """fp32 N(0, 1) noise of ``shape``: element L (row-major) is ``tl.randn(seed, start + L)``.

    Computed with numpy uint64 arithmetic on the host (about 3x faster than int64 torch ops
    for the sizes the CPU path sees), then moved to ``device``.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    n = math.prod(int(s) for s in shape)
    offset = np.arange(start, start + n, dtype=np.uint64)
    mask, s32 = np.uint64(_MASK32), np.uint64(32)
    c0, c1 = offset & mask, offset >> s32
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = seed & _MASK32, seed >> 32
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
    u1 = np.maximum(_uint_to_uniform(c0), np.float32(1.0e-7))
    u2 = _uint_to_uniform(c1)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    eps = r * np.cos(u2 * np.float32(6.283185307179586))
    return torch.from_numpy(eps.reshape(tuple(int(s) for s in shape))).to(device)


def _uint_to_uniform(u: np.ndarray) -> np.ndarray:
    """Triton's mapping of a random uint32 to [0, 1): as int32, x < 0 -> ~x, times 2^-31."""
    x = u.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


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


def reverse_step_reference(z, pred, t, coef_z, coef_eps, sigma, noise):
    """mu = coef_z[t] z - coef_eps[t] pred; z_{t-1} = mu + sigma[t] eps, sigma := 0 at t == 0."""
    cd = _compute_dtype(z)
    sig = torch.where(t == 0, torch.zeros_like(sigma[t]), sigma[t]).to(cd)
    sig = sig.view(-1, *([1] * (z.dim() - 1)))
    mu = _per_sample(coef_z, t, z) * z.to(cd) - _per_sample(coef_eps, t, z) * pred.to(cd)
    return _like(mu + sig * noise.to(cd), z)


def ddim_step_reference(z, pred, t, t_prev, alphas_cumprod, eta, noise, clip_x0=False):
    """DDIM (Song et al. 2021) from step t to the earlier step t_prev (-1: the clean image).

        x0     = (z_t - sqrt(1 - a_t) pred) / sqrt(a_t)
        sigma  = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        z_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) pred + sigma eps

    with a = alphas_cumprod[.] and a_prev = 1 where t_prev < 0; ``clip_x0`` clamps x0 to
    [-1, 1] before it is used.  eta = 0: deterministic
    (``noise`` may then be None).
    """
    cd = _compute_dtype(z)
    ac = alphas_cumprod.to(cd)
    a_t = ac[t]
    a_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], torch.ones_like(a_t))
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
    dir_coef = torch.sqrt((1 - a_prev - sigma**2).clamp(min=0))
    shape = (-1, *([1] * (z.dim() - 1)))
    zc, pc = z.to(cd), pred.to(cd)
    x0 = (zc - torch.sqrt(1 - a_t).view(shape) * pc) / torch.sqrt(a_t).view(shape)
    if clip_x0:  # as diffusers' DDIMScheduler(clip_sample=True); eps is kept as predicted
        x0 = x0.clamp(-1.0, 1.0)
    out = torch.sqrt(a_prev).view(shape) * x0 + dir_coef.view(shape) * pc
    if noise is not None:  # None: eta = 0, nothing to add
        out = out + sigma.view(shape) * noise.to(cd)
    return _like(out, z)
