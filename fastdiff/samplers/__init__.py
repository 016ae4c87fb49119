"""The samplers: one module each (ddpm, ddim, dpm_solver), one shared capture/replay runner
(``runner``), and the SamplerSpec value that names a sampler and its options (``spec``)."""

from .runner import (
    METHODS,
    SamplerRunner,
    StepBuffers,
    check_latents,
    check_run_args,
    initial_noise,
    run_sampler,
    sampling_timesteps,
)
from .spec import SAMPLERS, SamplerSpec

__all__ = [
    "METHODS",
    "SAMPLERS",
    "SamplerRunner",
    "SamplerSpec",
    "StepBuffers",
    "check_latents",
    "check_run_args",
    "initial_noise",
    "run_sampler",
    "sampling_timesteps",
]
