"""Fused DDIM step (Song et al. 2021; fastdiff.samplers.ddim): guidance, x0 clipping, noise.

Per sample n, once per program, with a_t = alphas_cumprod[t[n]] and a_prev =
alphas_cumprod[t_prev[n]] (1 where t_prev[n] = -1: the step to the clean image):

    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
    dir   = sqrt(max(1 - a_prev - sigma^2, 0))

and per element:

    eps = pred                 (GUIDED: pred_uncond + s (pred - pred_uncond), in registers)
    x0  = (z - sqrt(1 - a_t) eps) * (1 / sqrt(a_t))
    CLIP_X0:  x0c = clamp(x0, -1, 1)
              REDERIVE: eps = eps + sqrt(a_t / (1 - a_t)) (x0 - x0c)   (improved-diffusion;
              else diffusers' rule: eps kept)
    out = sqrt(a_prev) x0c + dir eps   (+ sigma noise with ADD_NOISE, i.e. eta > 0: a given
                                        tensor, or with NOISE_FROM_SEED the Philox noise of
                                        kernels.common, the same eps as the other kernels)

Every operation is the fp32 one of ``kernels.reference.ddim_step_reference``, in its order,
with correctly rounded square roots and divisions (``tl.sqrt_rn`` / ``tl.div_rn``, not the
approximate ``sqrt.approx`` / ``div.full`` of ``tl.sqrt`` and ``/``), so the interpreter
equals the reference bit for bit and compiled code differs only where LLVM contracts a
product and a sum into one FMA.  Those roots and divisions act on the per-sample scalars
only; per element there are products, sums and the clamp (a per-element ``div.rn`` costs
about ten instructions and a call to its slow path, around which the compiler spilled).

One pass reads z and pred (and pred_uncond, and a given noise) and writes the result; t,
t_prev and the seed are read from device memory, so a CUDA graph that captured this launch
draws fresh noise at every replay once the caller advances the seed buffer (samplers.runner
does, after every step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    chunk,
    chunk_noise,
    dense,
    launch,
    load_eps,
    program_sample,
    same_layout,
    seed_tensor,
)


@triton.jit
def ddim_step_kernel(
    z_ptr, pred_ptr, uncond_ptr, noise_ptr, out_ptr, t_ptr, t_prev_ptr, ac_ptr, seed_ptr,
    eta, guidance, n_per, C, HW, blocks_per_sample,
    ROWS: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr, LAYOUT: tl.constexpr,
    FAST_MATH: tl.constexpr, GUIDED: tl.constexpr, CLIP_X0: tl.constexpr,
    REDERIVE: tl.constexpr, ADD_NOISE: tl.constexpr, NOISE_FROM_SEED: tl.constexpr,
):  # fmt: skip
    n, _, _ = program_sample(n_per, blocks_per_sample)
    step_prev = tl.load(t_prev_ptr + n)
    a_t = tl.load(ac_ptr + tl.load(t_ptr + n)).to(tl.float32)
    a_prev = tl.load(ac_ptr + tl.maximum(step_prev, 0)).to(tl.float32)
    a_prev = tl.where(step_prev < 0, 1.0, a_prev)
    sigma = eta * tl.sqrt_rn(tl.div_rn(1.0 - a_prev, 1.0 - a_t))
    sigma = sigma * tl.sqrt_rn(1.0 - tl.div_rn(a_t, a_prev))
    dir_coef = tl.sqrt_rn(tl.maximum(1.0 - a_prev - sigma * sigma, 0.0))
    inv_sqrt_a = tl.div_rn(1.0, tl.sqrt_rn(a_t))
    sqrt_1m_a, sqrt_a_prev = tl.sqrt_rn(1.0 - a_t), tl.sqrt_rn(a_prev)
    if CLIP_X0 and REDERIVE:
        back = tl.sqrt_rn(tl.div_rn(a_t, 1.0 - a_t))  # d eps / d x0 at fixed z
    if NOISE_FROM_SEED:
        seed = tl.load(seed_ptr)  # once, before any store: the NHWC4 chunks share its calls
    for s in tl.static_range(NCH):
        base, offs, mask = chunk(n_per, blocks_per_sample, s, ROWS, W, NCH, LAYOUT)
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        eps = load_eps(pred_ptr, uncond_ptr, base, offs, mask, guidance, GUIDED)
        x0 = (z - sqrt_1m_a * eps) * inv_sqrt_a
        if CLIP_X0:
            clamped = tl.clamp(x0, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
            if REDERIVE:
                eps = eps + back * (x0 - clamped)
            x0 = clamped
        out = sqrt_a_prev * x0 + dir_coef * eps
        if ADD_NOISE:
            if NOISE_FROM_SEED:
                noise = chunk_noise(seed, base, offs, C, HW, blocks_per_sample, s,
                                    ROWS, W, NCH, LAYOUT, FAST_MATH)  # fmt: skip
            else:
                noise = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            out = out + sigma * noise
        tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def ddim_step_triton(
    z: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    seed=None,
    out: torch.Tensor | None = None,
    clip_x0: bool = False,
    clip_rule: str = "rederive",
    pred_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """z_{t_prev} for z, pred, pred_uncond, noise (B, ...), t, t_prev (B,) int (t_prev = -1:
    the clean image), alphas_cumprod (T,) fp32.

    eta > 0 adds sigma times ``noise`` or, given ``seed`` instead (an int or a 1-element int64
    tensor), the kernels' Philox noise of that seed; eta = 0 reads neither.  ``clip_x0`` with
    ``clip_rule`` "rederive" or "diffusers" (see the module docstring); ``pred_uncond`` turns
    on guidance with ``guidance_scale``.  The result has z's dtype and layout; ``out`` (same
    shape, dtype and strides as z; it may alias z) is written in place instead, any other
    ``out`` gets the result copied in.
    """
    z = dense(z)
    add_noise = eta > 0
    from_seed = add_noise and noise is None
    if add_noise and noise is None and seed is None:
        raise ValueError("noise, seed: eta > 0 needs one of them")
    target = out
    if out is None or out.shape != z.shape or out.stride() != z.stride():
        target = torch.empty_like(z)
    launch(
        ddim_step_kernel,
        z,
        seeded=from_seed,
        z_ptr=z,
        pred_ptr=same_layout(pred, z),
        uncond_ptr=same_layout(pred_uncond, z) if pred_uncond is not None else z,  # unread
        noise_ptr=same_layout(noise, z) if noise is not None else z,  # read with ADD_NOISE
        out_ptr=target,
        t_ptr=t.contiguous(),  # the kernel reads t[n] at t_ptr + n
        t_prev_ptr=t_prev.contiguous(),
        ac_ptr=alphas_cumprod,
        seed_ptr=seed_tensor(seed if from_seed else 0, z.device),
        eta=float(eta),
        guidance=float(guidance_scale),
        GUIDED=pred_uncond is not None,
        CLIP_X0=bool(clip_x0),
        REDERIVE=bool(clip_x0) and clip_rule == "rederive",
        ADD_NOISE=add_noise,
        NOISE_FROM_SEED=from_seed,
    )
    if out is None or target is out:
        return target
    return out.copy_(target)
