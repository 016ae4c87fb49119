"""The samplers: one module each (ddpm, ddim, dpm_solver), one shared capture/replay runner
(``runner``), the SamplerSpec value that names a sampler and its options (``spec``), and
classifier-free guidance of class-conditional models (``guidance``)."""

from .guidance import DEFAULT_GUIDANCE_SCALE, Guidance, check_guidance_args
from .runner import (
    METHODS,
    SamplerRunner,
    StepBuffers,
    check_latents,
    check_run_args,
    initial_noise,
    iter_sampler,
    run_sampler,
    sampling_timesteps,
)
from .spec import SAMPLERS, SamplerSpec

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "Guidance",
    "METHODS",
    "SAMPLERS",
    "SamplerRunner",
    "SamplerSpec",
    "StepBuffers",
    "check_guidance_args",
    "check_latents",
    "check_run_args",
    "initial_noise",
    "iter_sampler",
    "run_sampler",
    "sampling_timesteps",
]
