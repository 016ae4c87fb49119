"""DDPM (Algorithm 20.2): every one of the T steps with the fused reverse step.

    z_{t-1} = mu(z_t, pred) + sigma_t eps,  eps = Philox noise of the step's seed (none at t = 0)

with mu the reverse mean (at the clamped x0 with ``clip_x0``, improved-diffusion's
``clip_denoised``) and sigma_t^2 = beta_t or the posterior variance (``variance``); see
``ops.reverse_step``.  t advances by one per step (t - 1, read on the device).
"""

from __future__ import annotations

from .. import ops
from ..schedule import NoiseSchedule
from .spec import SamplerSpec


class DDPM:
    """The ddpm sampler's update on the runner's StepBuffers (see samplers.runner)."""

    needs_history = False

    def __init__(self, schedule: NoiseSchedule, spec: SamplerSpec):
        self.schedule = schedule
        self.spec = spec
        self.timesteps = self.sampling_timesteps(schedule.T, spec.steps)

    @staticmethod
    def sampling_timesteps(T: int, steps: int | None) -> list[int]:
        return list(range(T - 1, -1, -1))

    def unavailable(self) -> str | None:
        return None

    def update(self, buf, pred, pred_uncond=None, guidance_scale: float = 1.0) -> None:
        """z <- the step from pred (guided: pred_uncond + guidance_scale (pred -
        pred_uncond), formed in the fused kernel), in place; t (and k) advanced."""
        ops.reverse_step(
            buf.z,
            pred,
            buf.t,
            self.schedule,
            seed=buf.seed,
            variance=self.spec.variance,
            clip_x0=self.spec.clip_x0,
            validate=False,
            out=buf.z,
            pred_uncond=pred_uncond,
            guidance_scale=guidance_scale,
        )
        buf.t.sub_(1)
