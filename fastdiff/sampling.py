"""Compatibility names for the samplers package (fastdiff.samplers), which now holds them.

``Sampler(model, schedule, *, precision, channels_last, sampler=..., steps=..., ...)`` builds
the SamplerSpec of those keywords and returns its ``SamplerRunner``.
"""

from __future__ import annotations

from torch import nn

from .precision import Precision
from .samplers import (  # noqa: F401  (re-exported)
    SAMPLERS,
    SamplerRunner,
    SamplerSpec,
    StepBuffers,
    initial_noise,
    run_sampler,
    sampling_timesteps,
)
from .schedule import NoiseSchedule


def Sampler(  # noqa: N802  (the former class's name)
    model: nn.Module,
    schedule: NoiseSchedule,
    *,
    precision: Precision,
    channels_last: bool,
    variance: str = "beta",
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
    clip_rule: str = "rederive",
) -> SamplerRunner:
    """The runner of ``SamplerSpec(sampler, steps, eta, clip_x0, clip_rule, variance)``."""
    spec = SamplerSpec(sampler, steps, eta, clip_x0, clip_rule, variance)
    return SamplerRunner(model, schedule, spec, precision=precision, channels_last=channels_last)
