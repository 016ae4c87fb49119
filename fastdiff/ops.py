"""The three fused operations of DDPM, and the one place that picks Triton or the reference.

    q_sample      z_t = sqrt(alpha_t) x + sqrt(1 - alpha_t) eps            (forward / noising)
    noise_loss    mean of (pred - eps)^2                                  (Algorithm 20.1 loss)
    reverse_step  z_{t-1} = (z_t - beta_t / sqrt(1 - alpha_t) pred) / sqrt(1 - beta_t)
                            + sigma_t eps,   no noise where t == 0         (Algorithm 20.2)
    ddim_step     z_{t_prev} from the predicted x0 (Song et al. 2021; torch only so far)

``t`` holds 0-based step indices ``i = t - 1`` in ``0..T-1``, one per sample (shape (B,)).
Image-like tensors are (B, ...) -- usually (B, C, H, W) -- in fp32, bf16 or fp16 (fp64 on the
reference path), contiguous or channels_last; results keep the first tensor's dtype and layout
and arithmetic is fp32 (fp64 for fp64 inputs).

Noise: pass ``noise`` (a tensor shaped like the images) or ``seed`` (an int, or a 1-element
int64 tensor on the images' device).  With a seed, eps for logical element L is Philox-normal
noise of (seed, L), generated inside the kernel and never stored; the same seed gives the same
eps in q_sample, noise_loss and reverse_step, on both backends and in both memory layouts.

Dispatch: the ``FASTDIFF_BACKEND`` environment variable, read at every call, is ``auto``
(default: Triton for CUDA tensors, the torch reference otherwise), ``triton`` (also on CPU
tensors, which needs ``TRITON_INTERPRET=1`` set before Triton is imported) or ``reference``.
fp64 inputs always take the reference path.
"""

from __future__ import annotations

import os

import torch

from .kernels import reference as ref
from .schedule import NoiseSchedule

BACKEND_ENV = "FASTDIFF_BACKEND"
BACKENDS = ("auto", "triton", "reference")
VARIANCES = {"beta": "sigma_beta", "posterior": "sigma_posterior"}
IMAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SEED_LIMIT = 2**63


# -- dispatch --------------------------------------------------------------------------------


def backend_for(x: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"``: the implementation that an op on x will use."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {BACKENDS}, got {choice!r}")
    if choice == "reference" or x.dtype == torch.float64:
        return "reference"
    if choice == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{BACKEND_ENV}=triton on {x.device} tensors needs TRITON_INTERPRET=1 in the"
                " environment before triton is imported"
            )
        return "triton"
    return "triton" if x.is_cuda and _triton_importable() else "reference"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    """The Triton launchers (imported on first use, so CPU-only installs never need Triton)."""
    from .kernels import noise_loss, q_sample, reverse_step

    return q_sample, noise_loss, reverse_step


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
    if validate and T is not None and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= T:
            raise ValueError(f"t: step indices must lie in 0..{T - 1} (0-based), got {lo}..{hi}")


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
    if noise is not None:
        return noise
    return ref.reference_noise(int(seed), like)


def _seed_buffer(seed, device) -> torch.Tensor:
    """The seed as a private device tensor, for noise_loss's backward to regenerate eps from:
    the caller may change its own seed buffer between forward and backward."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).clone()
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def _broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


# -- autograd wrappers around the Triton launchers ---------------------------------------------


class QSampleFunction(torch.autograd.Function):
    """Triton q_sample; d z / d x = sqrt(alpha_t), d z / d noise = sqrt(1 - alpha_t)."""

    @staticmethod
    def forward(ctx, x, noise, t, sqrt_ac, sqrt_1m_ac, seed):
        ctx.save_for_backward(t, sqrt_ac, sqrt_1m_ac)
        return _kernels()[0].q_sample_triton(x, t, sqrt_ac, sqrt_1m_ac, noise, seed)

    @staticmethod
    def backward(ctx, grad):
        t, sqrt_ac, sqrt_1m_ac = ctx.saved_tensors
        g = grad.float()
        grad_x = grad_noise = None
        if ctx.needs_input_grad[0]:
            grad_x = (g * _broadcast(sqrt_ac[t], g)).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_noise = (g * _broadcast(sqrt_1m_ac[t], g)).to(grad.dtype)
        return grad_x, grad_noise, None, None, None, None


class NoiseLossFunction(torch.autograd.Function):
    """Triton noise_loss; backward regenerates eps and writes d loss / d pred in one pass."""

    @staticmethod
    def forward(ctx, pred, noise, weights, seed, reduction):
        _, kernel, _ = _kernels()
        B = pred.shape[0]
        n_per = pred.numel() // B
        per_sample = kernel.noise_loss_sums_triton(pred, noise, seed) / n_per
        if weights is not None:
            per_sample = per_sample * weights.float()
        ctx.save_for_backward(pred, noise, weights, seed)
        ctx.reduction, ctx.n_per = reduction, n_per
        return per_sample.mean() if reduction == "mean" else per_sample

    @staticmethod
    def backward(ctx, grad):
        pred, noise, weights, seed = ctx.saved_tensors
        B = pred.shape[0]
        scale = (2.0 / ctx.n_per) * grad.float().expand(B)
        if ctx.reduction == "mean":
            scale = scale / B
        if weights is not None:
            scale = scale * weights.float()
        grad_pred = _kernels()[1].noise_loss_grad_triton(pred, scale, noise, seed)
        grad_noise = -grad_pred if ctx.needs_input_grad[1] else None
        return grad_pred, grad_noise, None, None, None


class ReverseStepFunction(torch.autograd.Function):
    """Triton reverse_step; linear in z and pred, so its gradients are per-sample scalings."""

    @staticmethod
    def forward(ctx, z, pred, noise, t, coef_z, coef_eps, sigma, seed, out):
        ctx.save_for_backward(t, coef_z, coef_eps)
        return _kernels()[2].reverse_step_triton(
            z, pred, t, coef_z, coef_eps, sigma, noise, seed, out=out
        )

    @staticmethod
    def backward(ctx, grad):
        t, coef_z, coef_eps = ctx.saved_tensors
        g = grad.float()
        grad_z = (g * _broadcast(coef_z[t], g)).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_pred = (
            (-g * _broadcast(coef_eps[t], g)).to(grad.dtype) if ctx.needs_input_grad[1] else None
        )
        return grad_z, grad_pred, None, None, None, None, None, None, None


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
        validate: check that t lies in 0..T-1 (one device sync on CUDA; the training loop,
            whose t it draws itself, passes False).
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
    return QSampleFunction.apply(
        x,
        noise,
        t,
        schedule.table("sqrt_alphas_cumprod"),
        schedule.table("sqrt_one_minus_alphas_cumprod"),
        seed,
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
        validate: check that t holds non-negative indices (no upper bound is known here).
    Returns:
        fp32 loss (fp64 for fp64 pred), differentiable w.r.t. pred (and noise).
    """
    _check_images("pred", pred)
    _check_t(t, pred, None, False)
    if validate and t.numel() and int(t.min()) < 0:
        raise ValueError(f"t: step indices must be >= 0, got {int(t.min())}")
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
    return NoiseLossFunction.apply(
        pred, noise, weights, None if seed is None else _seed_buffer(seed, pred.device), reduction
    )


def reverse_step(
    z_t: torch.Tensor,
    pred: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    *,
    seed=None,
    variance: str = "beta",
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of Algorithm 20.2: z_{t-1} = mu(z_t, pred) + sigma_t eps.

        mu = (z_t - beta_t / sqrt(1 - alpha_t) * pred) / sqrt(1 - beta_t)

    Args:
        z_t: current latents (B, C, H, W); pred: the model's eps prediction, same shape.
        t: (B,) int64 0-based step indices; where t == 0 no noise is added (x = mu(z_1)).
        schedule: a NoiseSchedule on z_t's device.
        noise / seed: eps as for q_sample; a seed tensor lets a CUDA graph replay this op with
            fresh noise (the kernel reads seed and t from device memory).
        variance: ``"beta"`` (sigma_t^2 = beta_t, the seed's choice) or ``"posterior"``
            (sigma_t^2 = beta_t (1 - alpha_{t-1}) / (1 - alpha_t)).
        out: optional tensor like z_t to write the result into (may be z_t itself); only
            without autograd.
    Returns:
        z_{t-1}, shaped, typed and laid out like z_t.
    """
    _check_step_inputs(z_t, pred, t, schedule, validate)
    _check_noise_or_seed(noise, seed, z_t, "z_t")
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {sorted(VARIANCES)}, got {variance!r}")
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
        )
        return result if out is None else out.copy_(result)
    return ReverseStepFunction.apply(
        z_t,
        pred,
        noise,
        t,
        schedule.table("reverse_coef_z"),
        schedule.table("reverse_coef_eps"),
        schedule.table(VARIANCES[variance]),
        seed,
        out,
    )


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
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step (Song et al. 2021) from step t to an earlier step t_prev.

        x0     = (z_t - sqrt(1 - alpha_t) pred) / sqrt(alpha_t)
        z_prev = sqrt(alpha_prev) x0 + sqrt(1 - alpha_prev - sigma^2) pred + sigma eps,
        sigma  = eta sqrt((1 - alpha_prev) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_prev)

    Args:
        t, t_prev: (B,) int64 0-based indices with t_prev < t; t_prev = -1 means the clean
            image (alpha_prev = 1), so the last step returns x0.
        eta: 0 gives the deterministic DDIM sampler; 1 the DDPM-like stochastic one.
        clip_x0: clamp the predicted x0 to [-1, 1] (diffusers' ``clip_sample``).
        noise / seed: eps as for q_sample (multiplied by sigma, so not drawn when eta = 0).
    Always runs the torch reference (a fused kernel is future work).  With eta > 0 and a
    seed tensor on CUDA, drawing eps reads the seed back to the host, so such steps cannot be
    captured in a CUDA graph.
    """
    _check_step_inputs(z_t, pred, t, schedule, validate)
    if not isinstance(t_prev, torch.Tensor) or t_prev.shape != t.shape:
        raise ValueError(f"t_prev: expected a tensor shaped like t {tuple(t.shape)}")
    if validate and t.numel() and bool((t_prev >= t).any() or (t_prev < -1).any()):
        raise ValueError("t_prev: every t_prev must satisfy -1 <= t_prev < t")
    _check_noise_or_seed(noise, seed, z_t, "z_t")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
    cd = torch.float64 if z_t.dtype == torch.float64 else torch.float32
    result = ref.ddim_step_reference(
        z_t, pred, t, t_prev, schedule.table("alphas_cumprod", cd), float(eta),
        _reference_eps(noise, seed, z_t) if eta > 0 else None, clip_x0=clip_x0,
    )  # fmt: skip
    return result if out is None else out.copy_(result)
