"""SamplerSpec: the one value that says which trajectory a sampler follows.

``sample()``, the training grids and the CLI each build one (``SamplerSpec.checked``) and pass
it on; every option that changes the images travels in it, validated here and nowhere else:

    name       "ddpm" (every one of the T steps), "ddim", or "dpm++2m"
    steps      denoising steps (ddim: default 50; dpm++2m: default 20; ddpm: None or T)
    eta        ddim's noise scale in [0, 1] (0 for the others)
    clip_x0    clamp the predicted x0 to [-1, 1]; None: the sampler's default, resolved
               against a model's recorded sampling defaults by ``for_model``
    clip_rule  ddim with clip_x0: "rederive" or "diffusers" (see ops.ddim_step)
    variance   ddpm's noise: "beta" or "posterior"; None: the model's default (``for_model``)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..kernels.reference import CLIP_RULES
from ..validation import require_int

#: The samplers, in the order the CLI lists them.
SAMPLERS = ("ddpm", "ddim", "dpm++2m")
VARIANCES = ("beta", "posterior")
#: Fields for which ``checked`` reads None as "the default".
_DEFAULTED = ("eta", "clip_rule")
#: Denoising steps when ``steps`` is None.
DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20}


@dataclass(frozen=True)
class SamplerSpec:
    """Which sampler, how many steps, and how x0 and the noise are treated (module docstring).

    Constructing one validates it (a ValueError/TypeError naming the field); ``checked``
    does the same naming the caller's arguments (e.g. training's ``sample_sampler``) and,
    given T, also checks ``steps`` against the schedule.
    """

    name: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    clip_x0: bool | None = None
    clip_rule: str = "rederive"
    variance: str | None = None

    def __post_init__(self):
        _check(dataclasses.asdict(self), None, {})

    @classmethod
    def checked(cls, *, T: int | None = None, names: dict | None = None, **fields):
        """A SamplerSpec of ``fields`` (None for eta / clip_rule: their defaults), validated
        with errors naming ``names.get(field, field)``; with T, steps is checked against it."""
        values = {f.name: f.default for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in fields.items() if v is not None or k not in _DEFAULTED})
        _check(values, T, names or {})
        return cls(**values)

    def check_T(self, T: int, names: dict | None = None) -> SamplerSpec:
        """Raise unless ``steps`` suits a schedule of T steps; returns self."""
        _check(dataclasses.asdict(self), T, names or {})
        return self

    @property
    def num_steps_default(self) -> int | None:
        return DEFAULT_STEPS.get(self.name)

    def for_model(self, default: Callable[[str, object], object]) -> SamplerSpec:
        """This spec with clip_x0 / variance filled in where None: ``default(name, fallback)``
        is a model's recorded sampling default (``Diffusion.sampling_default``).  clip_x0:
        True for ddim; for ddpm the model's ``clip_x0`` (a diffusers clip_sample), else False;
        False for dpm++2m (DPMSolverMultistepScheduler's thresholding=False)."""
        clip_x0, variance = self.clip_x0, self.variance
        if clip_x0 is None:
            clip_x0 = {"ddim": True, "dpm++2m": False}.get(self.name)
            if clip_x0 is None:
                clip_x0 = bool(default("clip_x0", False))
        if variance is None:
            variance = default("variance", "beta")
        return dataclasses.replace(self, clip_x0=clip_x0, variance=variance)


def _check(spec: dict, T: int | None, names: dict) -> None:
    """Every field of a spec (given as a dict); messages name ``names.get(field)``, else the
    field (``sampler`` for name)."""

    def arg(field: str) -> str:
        return names.get(field, "sampler" if field == "name" else field)

    name, steps, eta = spec["name"], spec["steps"], spec["eta"]
    clip_x0, clip_rule, variance = spec["clip_x0"], spec["clip_rule"], spec["variance"]
    if name not in SAMPLERS:
        raise ValueError(f"{arg('name')}: expected one of {SAMPLERS}, got {name!r}")
    if steps is not None:
        require_int(arg("steps"), steps, 1, T)
        if name == "ddpm" and T is not None and steps != T:
            raise ValueError(
                f"{arg('steps')}: the ddpm sampler runs all T={T} steps of the trained"
                f" schedule, got {steps}; use {arg('name')}='ddim' for fewer"
            )
        if name == "dpm++2m" and T is not None and steps >= T:
            raise ValueError(
                f"{arg('steps')}: dpm++2m takes at most T-1={T - 1} steps (its linspace"
                f" spacing repeats a step at T), got {steps}"
            )
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"{arg('eta')}: expected a number in [0, 1], got {eta!r}")
    if eta and name != "ddim":
        raise ValueError(f"{arg('eta')}: only the ddim sampler takes eta > 0, got {eta!r}")
    if clip_x0 is not None and not isinstance(clip_x0, bool):
        raise TypeError(f"{arg('clip_x0')}: expected True, False or None, got {clip_x0!r}")
    if clip_rule not in CLIP_RULES:
        raise ValueError(f"{arg('clip_rule')}: expected one of {CLIP_RULES}, got {clip_rule!r}")
    if variance is not None and variance not in VARIANCES:
        raise ValueError(
            f"{arg('variance')}: expected one of {sorted(VARIANCES)}, got {variance!r}"
        )
