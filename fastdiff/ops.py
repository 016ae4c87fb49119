"""The three fused operations of DDPM, and the one place that picks Triton or the reference.

    q_sample      z_t = sqrt(alpha_t) x + sqrt(1 - alpha_t) eps            (forward / noising)
    noise_loss    mean of (pred - eps)^2                                  (Algorithm 20.1 loss)
    reverse_step  z_{t-1} = (z_t - beta_t / sqrt(1 - alpha_t) pred) / sqrt(1 - beta_t)
                            + sigma_t eps,   no noise where t == 0         (Algorithm 20.2)
    ddim_step     z_{t_prev} = sqrt(alpha_prev) x0 + dir pred + sigma eps,  x0 predicted from
                  z_t and pred (DDIM, Song et al. 2021; guidance, clipping, noise in one kernel)
    dpm_solver_step  z' = A z + B x0 + C (x0 - x0_prev), x0 = P z - Q pred   (DPM-Solver++ 2M;
                  coefficient rows per step, x0 kept for the next step)

``t`` holds 0-based step indices ``i = t - 1`` in ``0..T-1``, one per sample (shape (B,)).
Image-like tensors are (B, ...) -- usually (B, C, H, W) -- in fp32, bf16 or fp16 (fp64 on the
reference path), contiguous or channels_last; results keep the first tensor's dtype and layout
and arithmetic is fp32 (fp64 for fp64 inputs).

Noise: pass ``noise`` (a tensor shaped like the images) or ``seed`` (an int, or a 1-element
int64 tensor on the images' device).  With a seed, eps for logical element L is Philox-normal
noise of (seed, L), generated inside the kernel and never stored; the same seed gives the same
eps in q_sample, noise_loss, reverse_step and ddim_step and in both memory layouts: bit-identical on
one backend and device; the compiled CUDA kernels' eps (fast approximate log2/sin/cos)
stays within ``kernels.reference.noise_bound`` of the reference's (see kernels.common).

Dispatch: the ``FASTDIFF_BACKEND`` environment variable, read at every call, is ``auto``
(default: Triton for CUDA tensors, the torch reference otherwise), ``triton`` (also on CPU
tensors, which needs ``TRITON_INTERPRET=1`` set before Triton is imported) or ``reference``.
fp64 inputs always take the reference path.

Validation: with ``validate=True`` (the default) the step indices are range-checked (t in
0..T-1; noise_loss: t >= 0; ddim_step: -1 <= t_prev < t).  Eagerly that reads t on the host
(one device sync on CUDA) and raises a ValueError naming the argument; under torch.compile the
same condition is checked on the device inside the graph (``torch._assert_async``: a
RuntimeError naming the argument on CPU, a device-side assert on CUDA), so code calling the
ops with their defaults traces with ``fullgraph=True``.  ``validate=False`` skips the check
(the training loop and the samplers, which make t themselves).
"""

from __future__ import annotations

import math
import os

import torch

from .kernels import reference as ref
from .schedule import NoiseSchedule
from .validation import require_int

BACKEND_ENV = "FASTDIFF_BACKEND"
BACKENDS = ("auto", "triton", "reference")
VARIANCES = {"beta": "sigma_beta", "posterior": "sigma_posterior"}
CLIP_RULES = ref.CLIP_RULES
IMAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SEED_LIMIT = 2**63


# -- dispatch --------------------------------------------------------------------------------


def backend_for(x: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"``: the implementation that an op on x will use."""
    if x.dtype == torch.float64:
        return "reference"
    return backend_on(x.device)


def backend_on(device: torch.device) -> str:
    """``"triton"`` or ``"reference"``: the implementation of an fp32/bf16/fp16 op on
    ``device`` (what decides whether a step using the ops can be graph-captured there)."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {BACKENDS}, got {choice!r}")
    if choice == "reference":
        return "reference"
    cuda = torch.device(device).type == "cuda"
    if choice == "triton":
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{BACKEND_ENV}=triton on {device} tensors needs TRITON_INTERPRET=1 in the"
                " environment before triton is imported"
            )
        return "triton"
    return "triton" if cuda and triton_available() else "reference"


def triton_available() -> bool:
    """Whether Triton can be imported (a CPU-only install may lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    """The Triton launchers (imported on first use, so CPU-only installs never need Triton)."""
    from .kernels import noise_loss, q_sample, reverse_step

    return q_sample, noise_loss, reverse_step


def _dpm_kernels():
    from .kernels import dpm_solver

    return dpm_solver


def _ddim_kernels():
    from .kernels import ddim

    return ddim


# -- validation ------------------------------------------------------------------------------


def _check_images(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in IMAGE_DTYPES:
        raise TypeError(
            f"{name}: expected a floating tensor (float32, bfloat16, float16 or float64), got"
            f" {x.dtype}; convert integer images to [-1, 1] first"
        )
    if x.dim() < 2:
        raise ValueError(
            f"{name}: expected shape (B, ...) with at least 2 dims, got {tuple(x.shape)}"
        )


def _check_like(name: str, y, x: torch.Tensor, x_name: str) -> None:
    _check_images(name, y)
    if y.shape != x.shape:
        raise ValueError(
            f"{name}: expected the shape of {x_name} {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    if y.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} like {x_name}, got {y.device}")


def _check_t(t, x: torch.Tensor, T: int | None, validate: bool) -> None:
    """t: an int64/int32 (B,) tensor on x's device; with ``validate``, its values in 0..T-1
    (T None: only >= 0).

    Eagerly the range is read on the host (one device sync on CUDA) and a value outside it
    raises a ValueError naming t and the range found.  While torch.compile traces
    (``torch.compiler.is_compiling()``), where that host read cannot be traced, the same
    condition is checked on the device instead, inside the graph (``torch._assert_async``):
    a RuntimeError naming t when the compiled code runs on CPU, a device-side assert on CUDA
    (fatal to the process's CUDA context, but never a table read out of range).  Pass
    validate=False to skip both (no sync, no extra kernel).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"t: expected an integer torch.Tensor of shape (B,), got {type(t).__name__}"
        )
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"t: expected an int64 (or int32) tensor of step indices, got {t.dtype}")
    if t.shape != (x.shape[0],):
        raise ValueError(
            f"t: expected shape ({x.shape[0]},), one step per sample, got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"t: expected device {x.device} like the images, got {t.device}")
    if not (validate and t.numel()):
        return
    if torch.compiler.is_compiling():
        ok = (t >= 0) if T is None else (t >= 0) & (t < T)
        expected = ">= 0" if T is None else f"in 0..{T - 1} (0-based)"
        torch._assert_async(ok.all(), f"t: step indices must be {expected} (checked on device)")
        return
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one host read
    if T is None and lo < 0:
        raise ValueError(f"t: step indices must be >= 0, got {lo}")
    if T is not None and (lo < 0 or hi >= T):
        raise ValueError(f"t: step indices must lie in 0..{T - 1} (0-based), got {lo}..{hi}")


def _check_t_prev(t_prev, t: torch.Tensor, validate: bool) -> None:
    """t_prev: shaped like t; with ``validate``, -1 <= t_prev < t everywhere (a ValueError
    eagerly, a device-side check under torch.compile: see _check_t)."""
    if not isinstance(t_prev, torch.Tensor) or t_prev.shape != t.shape:
        raise ValueError(f"t_prev: expected a tensor shaped like t {tuple(t.shape)}")
    if t_prev.dtype not in (torch.int64, torch.int32) or t_prev.device != t.device:
        raise ValueError(
            f"t_prev: expected an int64 (or int32) tensor on {t.device} like t, got"
            f" {t_prev.dtype} on {t_prev.device}"
        )
    if not (validate and t.numel()):
        return
    ok = (t_prev < t) & (t_prev >= -1)
    message = "t_prev: every t_prev must satisfy -1 <= t_prev < t"
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), f"{message} (checked on device)")
    elif not bool(ok.all()):
        raise ValueError(message)


def _check_schedule(schedule, x: torch.Tensor) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
    if schedule.device != x.device:
        raise ValueError(
            f"schedule: its tables are on {schedule.device} but the images are on {x.device};"
            f" use schedule.to({str(x.device)!r})"
        )


def _check_noise_or_seed(noise, seed, x: torch.Tensor, x_name: str) -> None:
    if (noise is None) == (seed is None):
        raise ValueError("noise, seed: give exactly one of them (noise tensor or integer seed)")
    if noise is not None:
        _check_like("noise", noise, x, x_name)
        return
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(
                "seed: expected an int or a 1-element int64 tensor,"
                f" got {seed.numel()} element(s) of {seed.dtype}"
            )
        if seed.device != x.device:
            raise ValueError(
                f"seed: expected a tensor on {x.device} like {x_name}, got {seed.device}"
            )
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or an int64 tensor, got {type(seed).__name__}")
    elif not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed: expected 0 <= seed < 2**63, got {seed}")


def _check_step_inputs(z_t, pred, t, schedule, validate: bool) -> None:
    """The checks shared by the sampling steps: latents, prediction, steps, schedule."""
    _check_images("z_t", z_t)
    _check_like("pred", pred, z_t, "z_t")
    _check_schedule(schedule, z_t)
    _check_t(t, z_t, schedule.T, validate)


def _reference_eps(noise, seed, like: torch.Tensor) -> torch.Tensor:
    """eps for the reference path: ``noise``, or the kernels' Philox noise of the seed (through
    a custom op for seed tensors and under torch.compile, so tracing does not break)."""
    if noise is not None:
        return noise
    if isinstance(seed, int) and not torch.compiler.is_compiling():
        return ref.reference_noise(seed, like)
    return _philox_normal_op(_seed_tensor(seed, like.device), list(like.shape))


def _seed_tensor(seed, device) -> torch.Tensor:
    """The seed as a 1-element int64 tensor on ``device`` (a tensor is used as is)."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def _seed_buffer(seed, device) -> torch.Tensor:
    """The seed as a private device tensor, for noise_loss's backward to regenerate eps from:
    the caller may change its own seed buffer between forward and backward."""
    buffer = _seed_tensor(seed, device)
    return buffer.clone() if isinstance(seed, torch.Tensor) else buffer


def _broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


# -- the Triton launchers as torch custom ops ------------------------------------------------
#
# Registered in the "fastdiff" namespace with fake (meta) implementations and autograd, so that
# torch.compile traces code calling them without graph breaks (they stay opaque to Inductor:
# it calls them as they are).  Optional noise / seed are ``Tensor?`` in the schemas; the seed
# is a 1-element int64 tensor on the images' device.  Validation stays in the public functions.


def _dense_empty_like(x: torch.Tensor) -> torch.Tensor:
    """What the launchers allocate for a result like x: x's layout if x is contiguous or
    channels_last (``kernels.common.dense``), else contiguous."""
    if not (x.is_contiguous() or ref.is_channels_last(x)):
        x = x.contiguous()
    return torch.empty_like(x)


def _clip_args(clip) -> tuple:
    return tuple(clip) if clip is not None else (None, None, None)


@torch.library.custom_op("fastdiff::q_sample", mutates_args=())
def _q_sample_op(
    x: torch.Tensor,
    t: torch.Tensor,
    sqrt_ac: torch.Tensor,
    sqrt_1m_ac: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    """z = sqrt_ac[t] x + sqrt_1m_ac[t] eps (Triton); d z / d x = sqrt_ac[t], d z / d noise =
    sqrt_1m_ac[t]."""
    return _kernels()[0].q_sample_triton(x, t, sqrt_ac, sqrt_1m_ac, noise, seed)


@_q_sample_op.register_fake
def _(x, t, sqrt_ac, sqrt_1m_ac, noise, seed):
    return _dense_empty_like(x)


def _q_sample_setup(ctx, inputs, output):
    x, t, sqrt_ac, sqrt_1m_ac, noise, _ = inputs
    ctx.save_for_backward(t, sqrt_ac, sqrt_1m_ac)
    ctx.grad_x, ctx.grad_noise = x.requires_grad, noise is not None and noise.requires_grad


def _q_sample_backward(ctx, grad):
    t, sqrt_ac, sqrt_1m_ac = ctx.saved_tensors
    g = grad.float()
    grad_x = (g * _broadcast(sqrt_ac[t], g)).to(grad.dtype) if ctx.grad_x else None
    grad_noise = (g * _broadcast(sqrt_1m_ac[t], g)).to(grad.dtype) if ctx.grad_noise else None
    return grad_x, None, None, None, grad_noise, None


_q_sample_op.register_autograd(_q_sample_backward, setup_context=_q_sample_setup)


@torch.library.custom_op("fastdiff::noise_loss_sums", mutates_args=())
def _noise_loss_sums_op(
    pred: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample sums of (pred - eps)^2, fp32 (B,) (Triton).  d / d pred = 2 (pred - eps)."""
    return _kernels()[1].noise_loss_sums_triton(pred, noise, seed)


@_noise_loss_sums_op.register_fake
def _(pred, noise, seed):
    return pred.new_empty((pred.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastdiff::noise_loss_grad", mutates_args=())
def _noise_loss_grad_op(
    pred: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None
) -> torch.Tensor:
    """scale[n] * (pred - eps), like pred (Triton); eps regenerated from the seed."""
    return _kernels()[1].noise_loss_grad_triton(pred, scale, noise, seed)


@_noise_loss_grad_op.register_fake
def _(pred, scale, noise, seed):
    return _dense_empty_like(pred)


def _noise_loss_setup(ctx, inputs, output):
    pred, noise, seed = inputs
    ctx.save_for_backward(pred, noise, seed)
    ctx.grad_noise = noise is not None and noise.requires_grad


def _noise_loss_backward(ctx, grad):
    pred, noise, seed = ctx.saved_tensors
    grad_pred = _noise_loss_grad_op(pred, 2.0 * grad.float(), noise, seed)
    return grad_pred, (-grad_pred if ctx.grad_noise else None), None


_noise_loss_sums_op.register_autograd(_noise_loss_backward, setup_context=_noise_loss_setup)


@torch.library.custom_op("fastdiff::reverse_step", mutates_args=())
def _reverse_step_op(
    z: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    coef_z: torch.Tensor,
    coef_eps: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    clip_x0_z: torch.Tensor | None,
    clip_x0_eps: torch.Tensor | None,
    clip_coef_x0: torch.Tensor | None,
    pred_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """z_{t-1} (Triton); the three clip tables are all given (x0 clipping) or all None;
    ``pred_uncond`` given: guided eps (see ``reverse_step``)."""
    clip = None if clip_x0_z is None else (clip_x0_z, clip_x0_eps, clip_coef_x0)
    return _kernels()[2].reverse_step_triton(
        z, pred, t, coef_z, coef_eps, sigma, noise, seed, clip=clip, pred_uncond=pred_uncond,
        guidance_scale=guidance_scale,
    )  # fmt: skip


@_reverse_step_op.register_fake
def _(z, pred, t, coef_z, coef_eps, sigma, noise, seed, clip_x0_z, clip_x0_eps, clip_coef_x0,
      pred_uncond=None, guidance_scale=1.0):  # fmt: skip
    return _dense_empty_like(z)


@torch.library.custom_op("fastdiff::reverse_step_out", mutates_args=("out",))
def _reverse_step_out_op(
    out: torch.Tensor,
    z: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    coef_z: torch.Tensor,
    coef_eps: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    clip_x0_z: torch.Tensor | None,
    clip_x0_eps: torch.Tensor | None,
    clip_coef_x0: torch.Tensor | None,
    pred_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> None:
    """reverse_step written into ``out`` (which may be z itself: the sampler's static buffer)."""
    clip = None if clip_x0_z is None else (clip_x0_z, clip_x0_eps, clip_coef_x0)
    _kernels()[2].reverse_step_triton(
        z, pred, t, coef_z, coef_eps, sigma, noise, seed, out=out, clip=clip,
        pred_uncond=pred_uncond, guidance_scale=guidance_scale,
    )  # fmt: skip


@_reverse_step_out_op.register_fake
def _(out, z, pred, t, coef_z, coef_eps, sigma, noise, seed, clip_x0_z, clip_x0_eps,
      clip_coef_x0, pred_uncond=None, guidance_scale=1.0):  # fmt: skip
    return None


def _reverse_step_setup(ctx, inputs, output):
    z, pred, t, coef_z, coef_eps, sigma, noise, _, *clip, pred_uncond, scale = inputs
    ctx.clip = clip[0] is not None
    ctx.guided, ctx.scale = pred_uncond is not None, scale
    guided = (pred_uncond,) if ctx.guided else ()
    ctx.save_for_backward(
        t, coef_z, coef_eps, sigma, *((z, pred, *clip) if ctx.clip else ()), *guided
    )
    ctx.grad_z, ctx.grad_pred = z.requires_grad, pred.requires_grad
    ctx.grad_uncond = ctx.guided and pred_uncond.requires_grad
    ctx.noise_dtype = noise.dtype if noise is not None and noise.requires_grad else None


def _reverse_step_backward(ctx, grad):
    """Linear in z and eps: per-sample scalings.  With x0 clipping, where x0 is clamped the
    output no longer depends on x0: the x0 part, coef_x0 * x0, is taken out of the gradient
    there (x0 = sqrt_recip_ac z - sqrt_recipm1_ac eps, recomputed from the saved inputs).
    Guided, eps = u + s (pred - u): d/d pred = s d/d eps, d/d u = (1 - s) d/d eps.
    A given noise tensor: d/d noise = sigma[t] (0 at t == 0)."""
    t, coef_z, coef_eps, sigma, *saved = ctx.saved_tensors
    uncond = saved.pop() if ctx.guided else None
    g = grad.float()
    gz, gp = g * _broadcast(coef_z[t], g), -g * _broadcast(coef_eps[t], g)
    if ctx.clip:
        z, pred, sqrt_recip_ac, sqrt_recipm1_ac, coef_x0 = saved
        eps = ref.guided_eps(pred, uncond, ctx.scale).float()
        rz, re = _broadcast(sqrt_recip_ac[t], g), _broadcast(sqrt_recipm1_ac[t], g)
        x0 = rz * z.float() - re * eps
        # d(clamp(x0) - x0)/d x0 = -1 where clamped: remove coef_x0 * d x0.
        g_x0 = -g * _broadcast(coef_x0[t], g) * (x0.abs() > 1.0)
        gz, gp = gz + g_x0 * rz, gp - g_x0 * re
    grad_z = gz.to(grad.dtype) if ctx.grad_z else None
    scale = ctx.scale if ctx.guided else 1.0
    grad_pred = (scale * gp).to(grad.dtype) if ctx.grad_pred else None
    grad_uncond = ((1.0 - scale) * gp).to(grad.dtype) if ctx.grad_uncond else None
    grad_noise = None
    if ctx.noise_dtype is not None:
        sig = torch.where(t == 0, torch.zeros_like(sigma[t]), sigma[t])
        grad_noise = (g * _broadcast(sig, g)).to(ctx.noise_dtype)
    return (grad_z, grad_pred) + (None,) * 4 + (grad_noise,) + (None,) * 4 + (grad_uncond, None)


_reverse_step_op.register_autograd(_reverse_step_backward, setup_context=_reverse_step_setup)


@torch.library.custom_op("fastdiff::dpm_solver_step", mutates_args=("out", "x0_prev"))
def _dpm_solver_step_op(
    out: torch.Tensor,
    x0_prev: torch.Tensor,
    z: torch.Tensor,
    pred: torch.Tensor,
    step: torch.Tensor,
    coefs: torch.Tensor,
    clip_x0: bool,
    pred_uncond: torch.Tensor | None,
    guidance_scale: float,
) -> None:
    """dpm_solver_step (Triton): z' into ``out`` (may be z), this step's x0 into x0_prev."""
    _dpm_kernels().dpm_solver_step_triton(
        z, pred, step, x0_prev, coefs, out, clip_x0, pred_uncond, guidance_scale
    )


@_dpm_solver_step_op.register_fake
def _(out, x0_prev, z, pred, step, coefs, clip_x0, pred_uncond, guidance_scale):
    return None


@torch.library.custom_op("fastdiff::ddim_step", mutates_args=())
def _ddim_step_op(
    z: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    clip_x0: bool,
    clip_rule: str,
    pred_uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """z_{t_prev} (Triton; see ``ddim_step``); noise or seed is read only when eta > 0."""
    return _ddim_kernels().ddim_step_triton(
        z, pred, t, t_prev, alphas_cumprod, eta, noise, seed, clip_x0=clip_x0,
        clip_rule=clip_rule, pred_uncond=pred_uncond, guidance_scale=guidance_scale,
    )  # fmt: skip


@_ddim_step_op.register_fake
def _(z, pred, t, t_prev, alphas_cumprod, eta, noise, seed, clip_x0, clip_rule, pred_uncond,
      guidance_scale):  # fmt: skip
    return _dense_empty_like(z)


@torch.library.custom_op("fastdiff::ddim_step_out", mutates_args=("out",))
def _ddim_step_out_op(
    out: torch.Tensor,
    z: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
    seed: torch.Tensor | None,
    clip_x0: bool,
    clip_rule: str,
    pred_uncond: torch.Tensor | None,
    guidance_scale: float,
) -> None:
    """ddim_step written into ``out`` (which may be z itself: the sampler's static buffer)."""
    _ddim_kernels().ddim_step_triton(
        z, pred, t, t_prev, alphas_cumprod, eta, noise, seed, out=out, clip_x0=clip_x0,
        clip_rule=clip_rule, pred_uncond=pred_uncond, guidance_scale=guidance_scale,
    )  # fmt: skip


@_ddim_step_out_op.register_fake
def _(out, z, pred, t, t_prev, alphas_cumprod, eta, noise, seed, clip_x0, clip_rule,
      pred_uncond, guidance_scale):  # fmt: skip
    return None


def _ddim_step_setup(ctx, inputs, output):
    z, pred, t, t_prev, ac, eta, noise, _, clip_x0, clip_rule, uncond, scale = inputs
    ctx.eta, ctx.clip, ctx.rederive = eta, clip_x0, clip_rule == "rederive"
    ctx.guided, ctx.scale = uncond is not None, scale
    clip_inputs = (z, pred, *((uncond,) if ctx.guided else ())) if clip_x0 else ()
    ctx.save_for_backward(t, t_prev, ac, *clip_inputs)
    ctx.grad_z, ctx.grad_pred = z.requires_grad, pred.requires_grad
    ctx.grad_uncond = ctx.guided and uncond.requires_grad
    ctx.grad_noise = noise is not None and noise.requires_grad


def _ddim_step_backward(ctx, grad):
    """Linear in z, eps and noise per sample (``ref.ddim_coefficients``): with
    x0 = (z - sqrt(1 - a_t) eps) / sqrt(a_t) and out = sqrt(a_prev) x0 + dir eps + sigma noise,

        g_x0 = g sqrt(a_prev),  d z = g_x0 / sqrt(a_t),  d eps = g dir - d z sqrt(1 - a_t),
        d noise = g sigma.

    Where x0 is clamped the clamped value is a constant: g_x0 is 0 with the diffusers rule and
    g dir sqrt(a_t / (1 - a_t)) with the rederive one (eps' = eps + that factor (x0 -
    x0_clamped); x0 recomputed from the saved inputs).  Guided, eps = u + s (pred - u):
    d/d pred = s d/d eps, d/d u = (1 - s) d/d eps."""
    t, t_prev, ac, *saved = ctx.saved_tensors
    g = grad.float()
    c = ref.ddim_coefficients(t, t_prev, ac, ctx.eta)
    inv_sqrt_a, sqrt_1m_a, sqrt_a_prev, dir_coef, sigma, rederive = (_broadcast(v, g) for v in c)
    g_x0 = g * sqrt_a_prev
    if ctx.clip:
        z, pred, *uncond = saved
        eps = ref.guided_eps(pred, uncond[0] if ctx.guided else None, ctx.scale).float()
        x0 = (z.float() - sqrt_1m_a * eps) * inv_sqrt_a
        clamped_value = g * dir_coef * rederive if ctx.rederive else 0.0
        g_x0 = torch.where(x0.abs() > 1.0, clamped_value, g_x0)
    gz = g_x0 * inv_sqrt_a
    geps = g * dir_coef - gz * sqrt_1m_a
    scale = ctx.scale if ctx.guided else 1.0
    grad_z = gz.to(grad.dtype) if ctx.grad_z else None
    grad_pred = (scale * geps).to(grad.dtype) if ctx.grad_pred else None
    grad_uncond = ((1.0 - scale) * geps).to(grad.dtype) if ctx.grad_uncond else None
    grad_noise = (g * sigma).to(grad.dtype) if ctx.grad_noise else None
    return (grad_z, grad_pred) + (None,) * 4 + (grad_noise,) + (None,) * 3 + (grad_uncond, None)


_ddim_step_op.register_autograd(_ddim_step_backward, setup_context=_ddim_step_setup)


@torch.library.custom_op("fastdiff::philox_normal", mutates_args=())
def _philox_normal_op(seed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The kernels' eps for the reference path: fp32, contiguous, on the seed's device (drawn
    on the host from ``int(seed)``: a device sync on CUDA)."""
    return ref.philox_normal(int(seed.reshape(())), shape, device=seed.device)


@_philox_normal_op.register_fake
def _(seed, shape):
    return seed.new_empty(shape, dtype=torch.float32)


# -- public ops ------------------------------------------------------------------------------


def q_sample(
    x: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    *,
    seed=None,
    validate: bool = True,
) -> torch.Tensor:
    """Sample the diffusion kernel q(z_t | x): z_t = sqrt(alpha_t) x + sqrt(1 - alpha_t) eps.

    Args:
        x: clean images (B, C, H, W) (any (B, ...) works), fp32/bf16/fp16, in [-1, 1].
        t: (B,) int64 0-based step indices in 0..T-1 (index i is the paper's t = i + 1).
        schedule: a NoiseSchedule on x's device.
        noise: eps, shaped like x; or give ``seed`` instead to draw eps inside the kernel.
        seed: int in [0, 2**63) or a 1-element int64 tensor on x's device.
        validate: check that t lies in 0..T-1 (one device sync on CUDA; under
            torch.compile a device-side check instead: see the module docstring; the training
            loop, whose t it draws itself, passes False).
    Returns:
        z_t, shaped, typed and laid out like x.  Differentiable w.r.t. x (and noise).
    """
    _check_images("x", x)
    _check_schedule(schedule, x)
    _check_t(t, x, schedule.T, validate)
    _check_noise_or_seed(noise, seed, x, "x")
    if backend_for(x) == "reference":
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ref.q_sample_reference(
            x,
            t,
            schedule.table("sqrt_alphas_cumprod", cd),
            schedule.table("sqrt_one_minus_alphas_cumprod", cd),
            _reference_eps(noise, seed, x),
        )
    return _q_sample_op(
        x,
        t,
        schedule.table("sqrt_alphas_cumprod"),
        schedule.table("sqrt_one_minus_alphas_cumprod"),
        noise,
        None if seed is None else _seed_tensor(seed, x.device),
    )


def noise_loss(
    pred: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    seed=None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """The noise-prediction loss of Algorithm 20.1: ||pred - eps||^2, averaged.

    With the same ``seed`` that q_sample used, eps is regenerated in the kernel, so
    ``noise_loss(g(q_sample(x, t, s, seed=k), t), t, seed=k)`` is the DDPM loss with eps never
    in memory.

    Args:
        pred: the model's noise prediction (B, C, H, W), fp32/bf16/fp16.
        t: (B,) step indices of the batch; checked against pred's batch size (the loss itself
            does not depend on t: put any step weighting in ``weights``).
        noise / seed: eps, exactly as for q_sample.
        weights: optional (B,) per-sample weights (treated as constants: no gradient).
        reduction: ``"mean"`` -> scalar mean over all elements, i.e.
            mean_n(weights[n] * mean_chw (pred - eps)^2); ``"none"`` -> (B,) per-sample losses.
        validate: check that t holds non-negative indices (no upper bound is known here;
            under torch.compile a device-side check: see the module docstring).
    Returns:
        fp32 loss (fp64 for fp64 pred), differentiable w.r.t. pred (and noise).
    """
    _check_images("pred", pred)
    if pred.numel() == 0:  # a mean over no elements
        raise ValueError(f"pred: expected a non-empty batch, got shape {tuple(pred.shape)}")
    _check_t(t, pred, None, validate)
    _check_noise_or_seed(noise, seed, pred, "pred")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (pred.shape[0],):
            raise ValueError(f"weights: expected a tensor of shape ({pred.shape[0]},)")
        if weights.device != pred.device:
            raise ValueError(f"weights: expected device {pred.device}, got {weights.device}")
        weights = weights.detach()
    if backend_for(pred) == "reference":
        eps = _reference_eps(noise, seed, pred)
        return ref.noise_loss_reference(pred, eps, weights, reduction)
    seed = None if seed is None else _seed_buffer(seed, pred.device)
    per_sample = _noise_loss_sums_op(pred, noise, seed) / (pred.numel() // pred.shape[0])
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean() if reduction == "mean" else per_sample


def reverse_step(
    z_t: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    *,
    seed=None,
    variance: str = "beta",
    clip_x0: bool = False,
    validate: bool = True,
    out: torch.Tensor | None = None,
    pred_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """One step of Algorithm 20.2: z_{t-1} = mu(z_t, pred) + sigma_t eps.

        mu = (z_t - beta_t / sqrt(1 - alpha_t) * pred) / sqrt(1 - beta_t)

    With ``clip_x0`` (improved-diffusion's ``clip_denoised``), mu is the posterior mean at the
    clamped prediction of x0:

        x0 = (z_t - sqrt(1 - alpha_t) pred) / sqrt(alpha_t),
        mu = c0_t clamp(x0, -1, 1) + c1_t z_t      (posterior_mean_coef_x0 / _z)

    computed as mu + c0_t (clamp(x0) - x0), so it equals the formula above where x0 lies in
    [-1, 1].  Off by default: the default is Algorithm 20.2 exactly.

    Args:
        z_t: current latents (B, C, H, W); pred: the model's eps prediction, same shape.
        t: (B,) int64 0-based step indices; where t == 0 no noise is added (x = mu(z_1)).
        schedule: a NoiseSchedule on z_t's device.
        noise / seed: eps as for q_sample; a seed tensor lets a CUDA graph replay this op with
            fresh noise (the kernel reads seed and t from device memory).
        variance: ``"beta"`` (sigma_t^2 = beta_t, the seed's choice) or ``"posterior"``
            (sigma_t^2 = beta_t (1 - alpha_{t-1}) / (1 - alpha_t)).
        clip_x0: clamp the predicted x0 to [-1, 1] (see above).
        out: optional tensor like z_t to write the result into (may be z_t itself); only
            without autograd.
        pred_uncond, guidance_scale: classifier-free guidance: with the unconditional
            prediction pred_uncond (like pred; pred is then the conditional one) the step uses
            eps = pred_uncond + guidance_scale * (pred - pred_uncond), formed in the kernel
            and never stored (s = 1: pred, s = 0: pred_uncond).
    Returns:
        z_{t-1}, shaped, typed and laid out like z_t.
    """
    _check_step_inputs(z_t, pred, t, schedule, validate)
    _check_guidance(pred_uncond, guidance_scale, z_t)
    _check_noise_or_seed(noise, seed, z_t, "z_t")
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {sorted(VARIANCES)}, got {variance!r}")
    _check_flag("clip_x0", clip_x0)
    if backend_for(z_t) == "reference":
        cd = torch.float64 if z_t.dtype == torch.float64 else torch.float32
        result = ref.reverse_step_reference(
            z_t,
            pred,
            t,
            schedule.table("reverse_coef_z", cd),
            schedule.table("reverse_coef_eps", cd),
            schedule.table(VARIANCES[variance], cd),
            _reference_eps(noise, seed, z_t),
            clip=_clip_tables(schedule, cd) if clip_x0 else None,
            pred_uncond=pred_uncond,
            guidance_scale=float(guidance_scale),
        )
        return result if out is None else out.copy_(result)
    args = (
        z_t,
        pred,
        t,
        schedule.table("reverse_coef_z"),
        schedule.table("reverse_coef_eps"),
        schedule.table(VARIANCES[variance]),
        noise,
        None if seed is None else _seed_tensor(seed, z_t.device),
        *_clip_args(_clip_tables(schedule, torch.float32) if clip_x0 else None),
        pred_uncond,
        float(guidance_scale),
    )
    if out is None:
        return _reverse_step_op(*args)
    _reverse_step_out_op(out, *args)
    return out


def _clip_tables(schedule: NoiseSchedule, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(1 / sqrt(alpha_t), sqrt(1 / alpha_t - 1), posterior_mean_coef_x0): what x0 clipping
    reads (x0 = sqrt_recip * z - sqrt_recipm1 * pred: no division in the kernel)."""
    names = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef_x0")
    return tuple(schedule.table(name, dtype) for name in names)


def _check_guidance(pred_uncond, guidance_scale, z_t: torch.Tensor) -> None:
    if pred_uncond is not None:
        _check_like("pred_uncond", pred_uncond, z_t, "z_t")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale: expected a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def ddim_step(
    z_t: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    *,
    seed=None,
    eta: float = 0.0,
    clip_x0: bool = False,
    clip_rule: str = "rederive",
    validate: bool = True,
    out: torch.Tensor | None = None,
    pred_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """One DDIM step (Song et al. 2021) from step t to an earlier step t_prev.

        x0     = (z_t - sqrt(1 - alpha_t) pred) / sqrt(alpha_t)
        z_prev = sqrt(alpha_prev) x0 + sqrt(1 - alpha_prev - sigma^2) pred + sigma eps,
        sigma  = eta sqrt((1 - alpha_prev) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_prev)

    Args:
        t, t_prev: (B,) int64 0-based indices with t_prev < t; t_prev = -1 means the clean
            image (alpha_prev = 1), so the last step returns x0.
        eta: 0 gives the deterministic DDIM sampler; 1 the DDPM-like stochastic one.
        clip_x0: clamp the predicted x0 to [-1, 1].
        clip_rule: what the direction term uses once x0 is clamped: ``"rederive"`` (default,
            improved-diffusion) eps' = (z_t - sqrt(alpha_t) x0_clamped) / sqrt(1 - alpha_t),
            so the update is DDIM's for the clamped denoiser and converges as steps grow;
            ``"diffusers"`` keeps pred (DDIMScheduler's ``clip_sample=True,
            use_clipped_model_output=False``), which shifts z by sqrt(alpha_prev) (x0_clamped
            - x0) per step whatever the step size, so more steps drift further.
        noise / seed: eps as for q_sample, multiplied by sigma (so not drawn, and noise not
            read, when eta = 0); a seed tensor lets a CUDA graph replay this op with fresh
            noise (the kernel reads t, t_prev and the seed from device memory).
        validate: check -1 <= t_prev < t (and t's range) as the module docstring says.
        out: optional tensor like z_t to write the result into (may be z_t itself); only
            without autograd.
        pred_uncond, guidance_scale: classifier-free guidance as for ``reverse_step``: pred
            above is pred_uncond + guidance_scale * (pred - pred_uncond), formed in the kernel
            and never stored.
    Returns:
        z_{t_prev}, shaped, typed and laid out like z_t; differentiable w.r.t. z_t, pred,
        pred_uncond (and noise).

    Where dispatch picks Triton (CUDA tensors by default) this is one fused kernel
    (``kernels.ddim``) that forms the per-sample scalars once per program and guidance,
    clipping and noise in registers, so the step, eta > 0 included, can be captured in a
    CUDA graph; elsewhere the torch reference (``kernels.reference.ddim_step_reference``),
    whose Philox noise is drawn on the host from the seed.
    """
    _check_step_inputs(z_t, pred, t, schedule, validate)
    _check_t_prev(t_prev, t, validate)
    _check_guidance(pred_uncond, guidance_scale, z_t)
    _check_noise_or_seed(noise, seed, z_t, "z_t")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
    _check_flag("clip_x0", clip_x0)
    check_clip_rule(clip_rule)
    if out is not None:
        _check_like("out", out, z_t, "z_t")
    noisy = eta > 0
    if backend_for(z_t) == "reference":
        cd = torch.float64 if z_t.dtype == torch.float64 else torch.float32
        result = ref.ddim_step_reference(
            z_t, pred, t, t_prev, schedule.table("alphas_cumprod", cd), float(eta),
            _reference_eps(noise, seed, z_t) if noisy else None, clip_x0=clip_x0,
            clip_rule=clip_rule, pred_uncond=pred_uncond, guidance_scale=float(guidance_scale),
        )  # fmt: skip
        return result if out is None else out.copy_(result)
    args = (
        z_t, pred, t, t_prev, schedule.table("alphas_cumprod"), float(eta),
        noise if noisy else None,
        _seed_tensor(seed, z_t.device) if noisy and noise is None else None,
        clip_x0, clip_rule, pred_uncond, float(guidance_scale),
    )  # fmt: skip
    if out is None:
        return _ddim_step_op(*args)
    _ddim_step_out_op(out, *args)
    return out


def check_clip_rule(clip_rule) -> None:
    """Raise a ValueError naming ``clip_rule`` unless it is one of ``CLIP_RULES``."""
    if clip_rule not in CLIP_RULES:
        raise ValueError(f"clip_rule: expected one of {CLIP_RULES}, got {clip_rule!r}")


# -- GroupNorm (+ SiLU) for channels_last activations ----------------------------------------


def _group_norm_kernels():
    from .kernels import group_norm

    return group_norm


@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd) of the fused GroupNorm (+ SiLU) on a channels_last x (Triton)."""
    return _group_norm_kernels().group_norm_fwd_triton(x, weight, bias, num_groups, eps, silu)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastdiff::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d weight, d bias) of group_norm_silu for d out = grad (Triton)."""
    kernels = _group_norm_kernels()
    return kernels.group_norm_bwd_triton(grad, x, weight, bias, mean, rstd, num_groups, silu)


@_group_norm_silu_backward_op.register_fake
def _(grad, x, weight, bias, mean, rstd, num_groups, silu):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, _, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _group_norm_backward(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _group_norm_silu_backward_op(
        grad, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu
    )
    return dx, dw, db, None, None, None


_group_norm_silu_op.register_autograd(_group_norm_backward, setup_context=_group_norm_setup)


def group_norm_backend(x: torch.Tensor) -> str:
    """``"triton"`` where the fused kernel takes x (a 4-d channels_last tensor that
    ``backend_for`` sends to Triton), else ``"reference"`` (torch's GroupNorm, then SiLU)."""
    if x.dim() == 4 and ref.is_channels_last(x) and backend_for(x) == "triton":
        return "triton"
    return "reference"


def _check_affine(name: str, p, x: torch.Tensor) -> None:
    if p is None:
        return
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor of shape ({x.shape[1]},) or None")
    if p.shape != (x.shape[1],):
        raise ValueError(
            f"{name}: expected shape ({x.shape[1]},), one per channel, got {tuple(p.shape)}"
        )
    if p.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} like x, got {p.device}")


def _check_modulation(scale, shift, x: torch.Tensor) -> None:
    if (scale is None) != (shift is None):
        raise ValueError("scale, shift: give both (scale-shift conditioning) or neither")
    want = (x.shape[0], x.shape[1])
    for name, p in (("scale", scale), ("shift", shift)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.shape != want:
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(
                f"{name}: expected a floating tensor of shape {want} (one per sample and"
                f" channel), got {got}"
            )
        if p.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} like x, got {p.device}")


def _check_group_norm_args(x, num_groups, weight, bias, eps, silu, scale, shift) -> None:
    _check_images("x", x)
    C = x.shape[1]
    require_int("num_groups", num_groups)
    if C % num_groups:
        raise ValueError(f"num_groups: expected a divisor of the {C} channels, got {num_groups}")
    _check_affine("weight", weight, x)
    _check_affine("bias", bias, x)
    _check_modulation(scale, shift, x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    _check_flag("silu", silu)


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    silu: bool = True,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """GroupNorm over ``num_groups`` groups of x's channels, then (``silu``) SiLU.

        y   = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]   (biased var, per sample
                                                                         and group, fp32)
        y   = y * (1 + scale[n, c]) + shift[n, c]                      (with scale, shift)
        out = y * sigmoid(y) if silu else y

    Args:
        x: (N, C, *) activations, fp32/bf16/fp16 (fp64 on the reference path).
        num_groups: a positive divisor of C.
        weight, bias: (C,) affine parameters (any float dtype) or None (1 and 0).
        eps: added to the variance, > 0.
        scale, shift: (N, C) per-sample modulation (scale-shift conditioning), both or None.
        validate: check the arguments (modules that built their parameters pass False).
    Returns:
        out, shaped, typed and laid out like x; differentiable w.r.t. x, weight, bias, scale
        and shift.

    A 4-d channels_last x that dispatch sends to Triton (CUDA tensors by default) runs the
    fused kernels of ``kernels.group_norm`` (one statistics pass, one normalising pass; the
    backward likewise), also under torch.compile (a ``fastdiff::group_norm_silu`` custom op).
    Everything else -- contiguous x included, where torch's own kernels are good -- runs
    ``F.group_norm`` then ``F.silu`` exactly as a plain nn.GroupNorm + SiLU would.  With
    ``scale`` and ``shift`` the kernels take the folded per-sample affine
    ``weight (1 + scale)``, ``bias (1 + scale) + shift`` ((N, C), fp32, formed by torch, so
    autograd carries its gradient to weight, bias, scale and shift).
    """
    if validate:
        _check_group_norm_args(x, num_groups, weight, bias, eps, silu, scale, shift)
    if group_norm_backend(x) == "reference":
        return ref.group_norm_silu_reference(
            x, num_groups, weight, bias, float(eps), silu, scale, shift
        )
    if weight is None:
        weight = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    if bias is None:
        bias = torch.zeros(x.shape[1], dtype=weight.dtype, device=x.device)
    if scale is not None:
        gain = 1 + scale.float()
        weight, bias = weight.float() * gain, bias.float() * gain + shift.float()
    # The kernels index the affine as row n * C + c: a strided weight (a column of a bigger
    # parameter) or a fold of transposed (C, N).t() scale/shift must be made dense first.
    weight, bias = weight.contiguous(), bias.contiguous()
    return _group_norm_silu_op(x, weight, bias, num_groups, float(eps), silu)[0]


def dpm_solver_step(
    z_t: torch.Tensor,
    pred: torch.Tensor,
    step: torch.Tensor,
    x0_prev: torch.Tensor,
    coefs: torch.Tensor,
    *,
    clip_x0: bool = False,
    pred_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DPM-Solver++ (2M) step (fastdiff.samplers.dpm_solver), fused:

        eps = pred, or pred_uncond + guidance_scale (pred - pred_uncond) when pred_uncond
              is given (classifier-free guidance, formed in registers, never stored)
        x0  = P z_t - Q eps                      (clamped to [-1, 1] with clip_x0)
        z'  = A z_t + B x0 + C (x0 - x0_prev),   (P, Q, A, B, C) = coefs[step]

    C = 0 makes it a first-order (DDIM-like) step.  x0_prev is read and then overwritten with
    this step's x0, the next step's history.

    Args:
        z_t: latents (B, C, H, W), fp32/bf16/fp16 (fp64 on the reference path).
        pred: the model's eps prediction, shaped like z_t; pred_uncond likewise (or None).
        step: 1-element int64 tensor on z_t's device: the row of coefs (a CUDA graph reads
            it from memory at every replay).
        x0_prev: the previous step's x0 (any finite value where C = 0: it enters as C (x0 -
            x0_prev), and 0 * inf or NaN is NaN; zeros before the first step), shaped
            and laid out like z_t, float; overwritten in place.
        coefs: (N, 5) float32 table of rows (P, Q, A, B, C) on z_t's device
            (samplers.dpm_solver.dpm_coefficients).
        validate: check 0 <= step < N (one host read).
        out: optional tensor like z_t for z' (may be z_t itself).
    Returns:
        z', shaped, typed and laid out like z_t.
    """
    _check_images("z_t", z_t)
    _check_like("pred", pred, z_t, "z_t")
    if pred_uncond is not None:
        _check_like("pred_uncond", pred_uncond, z_t, "z_t")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale: expected a number, got {guidance_scale!r}")
    _check_like("x0_prev", x0_prev, z_t, "z_t")
    if out is not None:
        _check_like("out", out, z_t, "z_t")
    _check_flag("clip_x0", clip_x0)
    if not isinstance(coefs, torch.Tensor) or coefs.dim() != 2 or coefs.shape[1] != 5:
        raise ValueError("coefs: expected a (N, 5) tensor of rows (P, Q, A, B, C)")
    if coefs.device != z_t.device or not coefs.is_floating_point():
        raise ValueError(
            f"coefs: expected a float tensor on {z_t.device}, got {coefs.dtype} on {coefs.device}"
        )
    if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype != torch.int64:
        raise TypeError("step: expected a 1-element int64 tensor (the coefficient row)")
    if step.device != z_t.device:
        raise ValueError(f"step: expected device {z_t.device} like z_t, got {step.device}")
    if validate and not 0 <= int(step.reshape(())) < coefs.shape[0]:
        raise ValueError(
            f"step: expected a row in 0..{coefs.shape[0] - 1}, got {int(step.reshape(()))}"
        )
    if backend_for(z_t) == "reference":
        cd = torch.float64 if z_t.dtype == torch.float64 else torch.float32
        result, x0 = ref.dpm_solver_step_reference(
            z_t, pred, step, x0_prev, coefs.to(cd), clip_x0, pred_uncond, float(guidance_scale)
        )
        x0_prev.copy_(x0)
        return result if out is None else out.copy_(result)
    if not (z_t.is_contiguous() or ref.is_channels_last(z_t)):
        z_t = z_t.contiguous()
    if x0_prev.stride() != z_t.stride():
        raise ValueError("x0_prev: expected the memory layout of z_t (it is written in place)")
    target = out if out is not None and out.stride() == z_t.stride() else _dense_empty_like(z_t)
    _dpm_solver_step_op(
        target, x0_prev, z_t, pred, step.reshape(1), coefs.float().contiguous(), clip_x0,
        pred_uncond, float(guidance_scale),
    )  # fmt: skip
    if out is not None and target is not out:
        return out.copy_(target)
    return target
