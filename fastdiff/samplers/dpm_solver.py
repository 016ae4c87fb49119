"""DPM-Solver++ (2M): the multistep second-order solver in data prediction (Lu et al. 2022,
arXiv:2211.01095), equal to diffusers' ``DPMSolverMultistepScheduler(algorithm_type=
"dpmsolver++", solver_order=2)`` with its defaults.

With sigma_k = sqrt((1 - a_k) / a_k) at the visited steps (a = alphas_cumprod), alpha(s) =
1 / sqrt(1 + s^2), std(s) = s alpha(s), lambda(s) = -log s, step k goes from sigma_k to
sigma_{k+1} (sigma_N = 0):

    x0_k   = (z - std_k pred) / alpha_k = P_k z - Q_k pred       (clamped with clip_x0)
    h      = lambda_{k+1} - lambda_k,   r = (lambda_k - lambda_{k-1}) / h
    z'     = A_k z + B_k x0_k + C_k (x0_k - x0_{k-1})
    A_k    = std_{k+1} / std_k,   B_k = alpha_{k+1} (1 - e^{-h}),   C_k = B_k / (2 r)

(the "midpoint" form: D1 = (x0_k - x0_{k-1}) / r enters with half of B).  The first step and
the last have C = 0 (first order); the last goes to sigma = 0, where A = 0 and B = 1, so it
returns x0.  The rows (P, Q, A, B, C) are computed once in float64 and kept on the device as
an fp32 (N, 5) table indexed by the step counter k; the update is ``ops.dpm_solver_step``
(one fused kernel that also stores x0_k for the next step), so one captured graph serves
every step, first/last-order switches included.

diffusers defaults matched, and why each is what it is:

* ``timestep_spacing="linspace"``: steps round(linspace(0, T-1, N+1))[::-1][:-1], so the
  first is T-1 and the last is about (T-1)/N (never 0); at most T-1 steps (N = T would
  repeat one).
* ``final_sigmas_type="zero"``: the last step goes to sigma = 0 (the clean image), and is
  therefore first order (diffusers forces that whatever ``lower_order_final``).
* ``lower_order_final=True``, ``euler_at_final=False``: for solver_order=2 these change
  nothing beyond the last step above (the second-to-last rule only lowers order 3).
* ``thresholding=False``: no clipping by default.  ``clip_x0=True`` clamps x0 to [-1, 1],
  which is diffusers' ``thresholding=True`` with its default ``sample_max_value=1.0`` (the
  dynamic threshold s is clamped to [1, 1]); the clamped x0 is also what the next step reads.
* ``use_karras_sigmas`` / ``use_lu_lambdas`` / ``lambda_min_clipped``: off / off / -inf.
* ``prediction_type="epsilon"``, ``solver_type="midpoint"``, ``algorithm_type="dpmsolver++"``.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..schedule import NoiseSchedule
from .spec import DEFAULT_STEPS, SamplerSpec

#: Columns of the coefficient table.
P, Q, A, B, C = range(5)


def dpm_timesteps(T: int, steps: int | None) -> list[int]:
    """diffusers' "linspace" spacing: round(linspace(0, T-1, N+1)) reversed, without the 0."""
    n = steps or min(DEFAULT_STEPS["dpm++2m"], T - 1)
    return [int(t) for t in np.linspace(0, T - 1, n + 1).round()[::-1][:-1]]


def dpm_coefficients(alphas_cumprod: np.ndarray, timesteps: list[int]) -> np.ndarray:
    """The float64 (N, 5) rows (P, Q, A, B, C) of the module docstring for these steps."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)[timesteps]
    sigma = np.append(np.sqrt((1.0 - ac) / ac), 0.0)  # sigma_0 .. sigma_N
    alpha = 1.0 / np.sqrt(1.0 + sigma**2)
    std = sigma * alpha
    with np.errstate(divide="ignore"):
        lam = -np.log(sigma)  # +inf at sigma_N = 0
    n = len(timesteps)
    rows = np.zeros((n, 5))
    for k in range(n):
        h = lam[k + 1] - lam[k]
        rows[k, P] = 1.0 / alpha[k]
        rows[k, Q] = sigma[k]  # = std_k / alpha_k
        rows[k, A] = std[k + 1] / std[k]
        rows[k, B] = alpha[k + 1] * -np.expm1(-h)  # e^{-inf} = 0: B = 1 at the last step
        if 0 < k < n - 1:  # second order in between; first order at either end
            r = (lam[k] - lam[k - 1]) / h
            rows[k, C] = 0.5 * rows[k, B] / r
    return rows


class DPMSolver2M:
    """The dpm++2m sampler's update on the runner's StepBuffers (see samplers.runner)."""

    needs_history = True

    def __init__(self, schedule: NoiseSchedule, spec: SamplerSpec):
        self.spec = spec
        self.timesteps = self.sampling_timesteps(schedule.T, spec.steps)
        rows = dpm_coefficients(schedule.alphas_cumprod.cpu().numpy(), self.timesteps)
        self.coefs = torch.from_numpy(rows).float().to(schedule.device)
        # t after step k: the next visited step (0 after the last: never read by a model)
        nxt = torch.tensor([*self.timesteps[1:], 0], dtype=torch.long)
        self.next_t = nxt.to(schedule.device)

    @staticmethod
    def sampling_timesteps(T: int, steps: int | None) -> list[int]:
        return dpm_timesteps(T, steps)

    def unavailable(self) -> str | None:
        return None

    def update(self, buf, pred, pred_uncond=None, guidance_scale: float = 1.0) -> None:
        """z <- the step from pred (guided: pred_uncond + guidance_scale (pred -
        pred_uncond), formed in the fused kernel), in place; t (and k) advanced."""
        ops.dpm_solver_step(
            buf.z,
            pred,
            buf.k,
            buf.x0,
            self.coefs,
            clip_x0=self.spec.clip_x0,
            validate=False,
            out=buf.z,
            pred_uncond=pred_uncond,
            guidance_scale=guidance_scale,
        )
        buf.t.copy_(self.next_t[buf.k].expand_as(buf.t))
        buf.k.add_(1)
