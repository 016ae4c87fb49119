"""The evidence lower bound of a trained DDPM, in bits per dimension (``fastdiff eval``).

For an image x with D dimensions (pixels in [-1, 1], 256 levels), -log p(x) <= L(x) with

    L = KL(q(z_T | x) || N(0, I))                                    prior term
      + sum_{i=1..T-1} KL(q(z_{i-1} | z_i, x) || p(z_{i-1} | z_i))   diffusion terms
      - log p(x | z_0)                                               decoder term

in the 0-based index convention (i = t - 1; z_i is the paper's z_t).  Each diffusion term uses
one z_i ~ q(z_i | x) and the model's eps prediction:

    q(z_{i-1} | z_i, x) = N(coef_x0[i] x + coef_z[i] z_i, posterior_variance[i])
    p(z_{i-1} | z_i)    = N(mu(z_i, g(z_i, i)), sigma_i^2),  sigma_i^2 = beta_i or posterior

and the decoder is the discretized Gaussian of Ho et al.: N(mu(z_0, g), beta_0) integrated
over each pixel's bin of width 2/255 (the outer bins extend to +-infinity).
bits/dim = L / (D ln 2).  Every term is computed in float64 from the model's prediction.
"""

from __future__ import annotations

import math

import torch

from . import ops
from .diffusion import Diffusion
from .labels import check_labels
from .precision import memory_format, resolve_channels_last, resolve_precision
from .progress import progress_bar
from .schedule import NoiseSchedule
from .validation import require_int

_BIN = 1.0 / 255.0


def gaussian_kl(mean_q, var_q, mean_p, var_p) -> torch.Tensor:
    """Elementwise KL(N(mean_q, var_q) || N(mean_p, var_p)) in nats."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


def discretized_gaussian_log_likelihood(x, mean, std) -> torch.Tensor:
    """log P(x) per element for x on the 256-level grid of [-1, 1], under N(mean, std^2)
    integrated over x's bin [x - 1/255, x + 1/255] (the edge bins reach -inf / +inf)."""
    upper = torch.special.ndtr((x - mean + _BIN) / std)
    lower = torch.special.ndtr((x - mean - _BIN) / std)
    prob = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1.0 - lower, upper - lower))
    return torch.log(prob.clamp(min=1e-12))


def prior_kl(x: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """KL(q(z_T | x) || N(0, I)) per image, nats: q(z_T | x) = N(sqrt(a_T) x, 1 - a_T)."""
    a = schedule.alphas_cumprod[-1]
    kl = gaussian_kl(torch.sqrt(a) * x, (1 - a).expand_as(x), torch.zeros_like(x),
                     torch.ones_like(x))  # fmt: skip
    return kl.flatten(1).sum(1)


@torch.inference_mode()
def elbo_terms(model, schedule: NoiseSchedule, x: torch.Tensor, *, seed: int,
               variance: str = "beta", precision=None, channels_last=False,
               on_step=None, labels: torch.Tensor | None = None) -> dict:  # fmt: skip
    """The bound's terms for a batch x (B, C, H, W) in [-1, 1], each (B,) nats, float64.

    Returns {"prior": (B,), "diffusion": (B,) sum over i = 1..T-1, "decoder": (B,) -log p}.
    Uses one model call per step index (T calls); z_i is drawn with noise seed ``seed + i``.
    ``on_step()``, if given, is called after each of the T steps (progress bars).
    ``labels`` (B,): a class-conditional model is called as model(z, t, labels), which makes
    the bound one on the conditional likelihood log p(x | y).
    """
    if variance not in ops.VARIANCES:
        raise ValueError(f"variance: expected one of {sorted(ops.VARIANCES)}, got {variance!r}")
    device = x.device
    precision = precision or resolve_precision("fp32", device)
    x64 = x.double()
    B = x.shape[0]
    x_in = x.float().contiguous(memory_format=memory_format(channels_last))
    tab = {name: schedule.table(name, torch.float64) for name in (
        "reverse_coef_z", "reverse_coef_eps", "posterior_mean_coef_x0", "posterior_mean_coef_z",
        "posterior_variance", "betas")}  # fmt: skip
    var_p_table = tab["betas"] if variance == "beta" else tab["posterior_variance"]
    diffusion = torch.zeros(B, dtype=torch.float64, device=device)
    decoder = None
    for i in range(schedule.T):
        t = torch.full((B,), i, dtype=torch.long, device=device)
        z = ops.q_sample(x_in, t, schedule, seed=seed + i, validate=False)
        with precision.autocast(device):
            pred = model(z, t) if labels is None else model(z, t, labels)
        if on_step is not None:
            on_step()
        z64, pred64 = z.double(), pred.double()
        mean_p = tab["reverse_coef_z"][i] * z64 - tab["reverse_coef_eps"][i] * pred64
        if i == 0:
            std = torch.sqrt(tab["betas"][0])
            decoder = -discretized_gaussian_log_likelihood(x64, mean_p, std).flatten(1).sum(1)
            continue
        mean_q = tab["posterior_mean_coef_x0"][i] * x64 + tab["posterior_mean_coef_z"][i] * z64
        var_q = tab["posterior_variance"][i].expand_as(x64)
        kl = gaussian_kl(mean_q, var_q, mean_p, var_p_table[i].expand_as(x64))
        diffusion += kl.flatten(1).sum(1)
    return {"prior": prior_kl(x64, schedule), "diffusion": diffusion, "decoder": decoder}


def bits_per_dim(diffusion: Diffusion, images: torch.Tensor, *, batch_size: int = 64,
                 seed: int = 0, use_ema: bool = True, variance: str = "beta",
                 progress: bool = False, labels=None) -> dict:  # fmt: skip
    """The bound in bits/dim averaged over ``images`` (N, C, H, W) in [-1, 1].

    ``labels`` (N,) ints in 0..num_classes-1: for a class-conditional model, the bound on
    the conditional likelihood -log p(x | y) (None: the null class, log p(x)); an error for
    an unconditional one.
    Returns {"bits_per_dim", "prior", "diffusion", "decoder"} (each in bits/dim), "images"
    and "conditional" (whether labels were used).
    """
    if images.dim() != 4 or tuple(images.shape[1:]) != diffusion.image_shape:
        raise ValueError(
            f"data: expected images of shape (N, {', '.join(map(str, diffusion.image_shape))}),"
            f" got {tuple(images.shape)}"
        )
    require_int("batch_size", batch_size)
    if labels is not None:
        if diffusion.num_classes is None:
            raise ValueError("labels: this model is unconditional (no num_classes); omit labels")
        labels = check_labels(labels, images.shape[0], diffusion.num_classes)
    net = diffusion.ema_model if use_ema and diffusion.ema_model is not None else diffusion.model
    device = diffusion.device
    prec = resolve_precision("auto", device)
    cl = resolve_channels_last(None, device, prec)
    was_training = net.training
    net.eval()
    totals = {"prior": 0.0, "diffusion": 0.0, "decoder": 0.0}
    batches = range(0, images.shape[0], batch_size)
    T = diffusion.schedule.T
    bar = progress_bar(len(batches) * T, desc="eval", unit="step", enabled=progress)
    try:
        for start in batches:
            x = images[start : start + batch_size].to(device)
            y = None if labels is None else labels[start : start + batch_size].to(device)
            terms = elbo_terms(net, diffusion.schedule, x, seed=seed + start * diffusion.schedule.T,
                               variance=variance, precision=prec, channels_last=cl,
                               on_step=bar.update, labels=y)  # fmt: skip
            for k in totals:
                totals[k] += float(terms[k].sum())
    finally:
        bar.close()
        net.train(was_training)
    dims = images.shape[0] * math.prod(diffusion.image_shape) * math.log(2.0)
    result = {k: v / dims for k, v in totals.items()}
    result["bits_per_dim"] = sum(result.values())
    result["images"] = images.shape[0]
    result["conditional"] = labels is not None
    return result
