"""DDIM (Song et al. 2021): ``steps`` evenly spaced steps T-1 .. 0 with the DDIM update.

    x0     = (z_t - sqrt(1 - a_t) pred) / sqrt(a_t)     (clamped with ``clip_x0``)
    z_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps' + sigma noise

(see ``ops.ddim_step`` for sigma(eta) and the clip rules), one fused kernel (``kernels.ddim``)
that also forms the guided eps and draws the noise.  The next step index comes from a device
table, ``prev_step[t]`` (-1 after the last step), and the noise from the step's seed buffer
(advanced by the runner after every step), so one captured step serves every replay, eta > 0
included: each replay draws fresh noise, the eager chain's.
"""

from __future__ import annotations

import torch

from .. import ops
from ..schedule import NoiseSchedule
from .spec import DEFAULT_STEPS, SamplerSpec


class DDIM:
    """The ddim sampler's update on the runner's StepBuffers (see samplers.runner)."""

    needs_history = False

    def __init__(self, schedule: NoiseSchedule, spec: SamplerSpec):
        self.schedule = schedule
        self.spec = spec
        self.timesteps = self.sampling_timesteps(schedule.T, spec.steps)
        prev = torch.full((schedule.T,), -1, dtype=torch.long)
        prev[self.timesteps[:-1]] = torch.tensor(self.timesteps[1:], dtype=torch.long)
        self.prev_step = prev.to(schedule.device)

    @staticmethod
    def sampling_timesteps(T: int, steps: int | None) -> list[int]:
        """``steps`` (default 50, at most T) indices evenly spaced from T-1 down to 0."""
        steps = min(steps or DEFAULT_STEPS["ddim"], T)
        return sorted({round(i * (T - 1) / max(steps - 1, 1)) for i in range(steps)}, reverse=True)

    def unavailable(self) -> str | None:
        """None: every setting is capturable on the kernel path (the noise comes from the
        seed in device memory; the reference path is refused by cuda_graphs.unavailable_reason)."""
        return None

    def update(self, buf, pred, pred_uncond=None, guidance_scale: float = 1.0) -> None:
        """z <- the step from pred (guided: pred_uncond + guidance_scale (pred -
        pred_uncond), formed in the fused kernel), in place; t (and k) advanced."""
        t_prev = self.prev_step[buf.t]
        ops.ddim_step(
            buf.z,
            pred,
            buf.t,
            t_prev,
            self.schedule,
            seed=buf.seed,
            eta=self.spec.eta,
            clip_x0=self.spec.clip_x0,
            clip_rule=self.spec.clip_rule,
            validate=False,
            out=buf.z,
            pred_uncond=pred_uncond,
            guidance_scale=guidance_scale,
        )
        buf.t.copy_(t_prev)
