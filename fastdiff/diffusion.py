"""A trained diffusion model: the denoiser, its EMA weights, the schedule and the config.

``fastdiff.train`` returns a Diffusion, ``fastdiff.load`` rebuilds one from a checkpoint, and
``fastdiff.sample`` / ``Diffusion.sample`` draw images from it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import cuda_graphs
from .errors import CheckpointError
from .labels import model_num_classes
from .low_precision import sampling_model
from .precision import (
    resolve_channels_last,
    resolve_device,
    resolve_precision,
    to_channels_last,
)
from .samplers import (
    SamplerRunner,
    SamplerSpec,
    check_guidance_args,
    check_latents,
    check_run_args,
    iter_sampler,
)
from .schedule import NoiseSchedule
from .unet import UNet


class Diffusion:
    """The denoiser g(z, t) (and its EMA copy), the NoiseSchedule, and how it was trained.

    Attributes:
        model: the trained nn.Module, forward(z, t) -> predicted eps.
        ema_model: the exponential moving average of model's weights, or None.
        schedule: the NoiseSchedule it was trained with (on the model's device).
        image_shape: (C, H, W) of the images it generates.
        config: JSON-serialisable record of the model, schedule and training settings;
            ``config["sampling"]`` may hold sampling defaults (``variance``, ``clip_x0``),
            e.g. from a diffusers scheduler config.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        image_shape: tuple[int, int, int],
        *,
        ema_model: nn.Module | None = None,
        config: dict | None = None,
    ):
        self.model = model
        self.ema_model = ema_model
        self.schedule = schedule.to(self.device)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.config = dict(config or {})

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def num_classes(self) -> int | None:
        """The classes of a class-conditional model (labels 0..K-1; K is its null class),
        None for an unconditional one (fastdiff.labels.model_num_classes)."""
        return model_num_classes(self.model)

    def to(self, device) -> Diffusion:
        device = torch.device(device)
        self.model.to(device)
        if self.ema_model is not None:
            self.ema_model.to(device)
        self.schedule = self.schedule.to(device)
        return self

    def sample(self, n: int, **kwargs) -> torch.Tensor:
        """``fastdiff.sample(self, n, **kwargs)``."""
        return sample(self, n, **kwargs)

    def sampling_default(self, name: str, fallback):
        """``config["sampling"][name]`` (a default that ``sample`` uses), else ``fallback``."""
        return self.config.get("sampling", {}).get(name, fallback)

    def checkpoint_config(self) -> dict:
        """What config.json records: enough to rebuild this object with ``fastdiff.load``."""
        model_cfg = getattr(self.model, "config", None)
        return dict(
            self.config,
            model={
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "config": model_cfg if isinstance(model_cfg, dict) else None,
            },
            schedule=self.schedule.config(),
            image_shape=list(self.image_shape),
        )

    def save(self, path: str | Path, format: str = "fastdiff", *, use_ema: bool = True) -> Path:
        """Write weights, EMA weights and config to the directory ``path`` (atomically).

        ``format="diffusers"`` writes a DDPMPipeline directory instead (model_index.json,
        unet/, scheduler/; see fastdiff.diffusers_io.save_pipeline) with the EMA weights, or
        the raw ones when ``use_ema=False`` or there are none; ``path`` must be new or empty.
        """
        if format == "diffusers":
            from .diffusers_io import save_pipeline

            return save_pipeline(self, path, use_ema=use_ema)
        if format != "fastdiff":
            raise ValueError(f"format: expected 'fastdiff' or 'diffusers', got {format!r}")
        return ckpt.write_checkpoint(
            path,
            model_state=self.model.state_dict(),
            ema_state=None if self.ema_model is None else self.ema_model.state_dict(),
            config=self.checkpoint_config(),
        )

    def __repr__(self) -> str:
        return (
            f"Diffusion(model={type(self.model).__name__}, image_shape={self.image_shape},"
            f" schedule={self.schedule!r}, ema={self.ema_model is not None})"
        )


def build_model(config: dict, model: nn.Module | None, where: str) -> nn.Module:
    """The denoiser described by a checkpoint config (a UNet), or ``model`` for custom classes."""
    described = config.get("model", {})
    cls_name = described.get("class", "")
    if model is not None:
        return model
    if cls_name.endswith(".UNet") and described.get("config") is not None:
        return UNet(**described["config"])
    if cls_name == "fastdiff.diffusers_io.DiffusersUNet" and described.get("config") is not None:
        from .diffusers_io import DiffusersUNet

        return DiffusersUNet.from_config(described["config"])
    raise CheckpointError(
        f"checkpoint: {where!r} holds a {cls_name or 'custom'} model; pass model= (an instance"
        " of that class) to fastdiff.load to receive its weights"
    )


def load(
    path: str | Path, *, model: nn.Module | None = None, device=None, scheduler=None
) -> Diffusion:
    """Rebuild a trained Diffusion from a checkpoint directory or a run's output directory.

    Args:
        path: a checkpoint (with config.json), a ``checkpoints/`` folder, or a training run's
            output directory (its latest checkpoint is used); or a local diffusers
            DDPMPipeline or UNet2DModel directory (see fastdiff.diffusers_io.load_diffusers).
            A checkpoint directory is loaded strictly: damaged weights (size or SHA-256 not
            as recorded) raise a CheckpointError.  Given a run or ``checkpoints/`` folder, the
            newest checkpoint whose config and weights verify is loaded, as resume does: a
            damaged newer one is skipped with one warning (logger "fastdiff") naming it and
            why (fastdiff.checkpoint.find_intact_checkpoint; its state.pt is not needed here,
            so not checked); none intact raises a CheckpointError naming each.
        model: an instance to load the weights into, needed for models other than UNet.
        device: where to put it (default: CUDA when available, else CPU).
        scheduler: for a diffusers UNet2DModel directory, its scheduler config (a
            scheduler_config.json or its folder) when it is not beside it or in ../scheduler.
    """
    from . import diffusers_io  # imports diffusers only to wrap a model it cannot convert

    if diffusers_io.detect(path) is not None:
        if model is not None:
            raise ValueError("model: a diffusers directory describes its own model; omit model=")
        return diffusers_io.load_diffusers(path, scheduler=scheduler, device=device)
    if scheduler is not None:
        raise ValueError("scheduler: only a diffusers UNet2DModel directory takes a scheduler")
    directory, skipped = ckpt.find_intact_checkpoint(path, only=(ckpt.MODEL, ckpt.EMA))
    ckpt.log_skipped("loading", directory, skipped)
    config = ckpt.read_config(directory)
    names = [n for n in (ckpt.MODEL, ckpt.EMA) if n in config.get("files", {})]
    device = resolve_device(device)
    net = build_model(config, model, str(directory))
    _load_into(net, ckpt.load_weights(directory, ckpt.MODEL), directory)
    ema = None
    if ckpt.EMA in names:
        ema = copy.deepcopy(net)
        _load_into(ema, ckpt.load_weights(directory, ckpt.EMA), directory)
        ema.to(device).eval().requires_grad_(False)
    net.to(device).eval()
    try:
        schedule = NoiseSchedule.from_config(config["schedule"])
        image_shape = tuple(config["image_shape"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: {str(directory)!r} has a bad config: {exc}") from exc
    keep = {k: v for k, v in config.items() if k not in ("files", "format_version")}
    return Diffusion(net, schedule.to(device), image_shape, ema_model=ema, config=keep)


def _load_into(module: nn.Module, state: dict, directory: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint: {str(directory)!r} does not match the model's configuration: {first}"
        ) from exc


def sample(
    diffusion_or_path,
    n: int,
    *,
    steps: int | None = None,
    sampler: str | SamplerSpec = "ddpm",
    seed: int | None = None,
    batch_size: int | None = None,
    use_ema: bool = True,
    variance: str | None = None,
    eta: float | None = None,
    clip_x0: bool | None = None,
    clip_rule: str | None = None,
    cuda_graph: bool = True,
    precision: str | None = None,
    channels_last=None,
    device=None,
    progress: bool = False,
    strict: bool | None = None,
    latents: torch.Tensor | None = None,
    labels=None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """Draw n images with Algorithm 20.2 (the fused reverse step), (n, C, H, W) in [-1, 1].

    Args:
        diffusion_or_path: a Diffusion, or a checkpoint path for ``fastdiff.load``.
        n: number of images.
        sampler: "ddpm" (Algorithm 20.2, every one of the T steps, fused reverse step),
            "ddim" (Song et al. 2021: ``steps`` evenly spaced steps, default 50) or
            "dpm++2m" (DPM-Solver++ 2M, diffusers' DPMSolverMultistepScheduler defaults:
            ``steps`` steps, default 20; fastdiff.samplers.dpm_solver).  Or a SamplerSpec
            holding the sampler and its options (then steps, eta, clip_x0, clip_rule and
            variance stay unset here).
        steps: for ddim and dpm++2m, how many denoising steps; for ddpm None or T.
        seed: same seed -> same images (on the same device and backend); None draws one.
        batch_size: images denoised at once (default min(n, 256)).
        use_ema: sample with the EMA weights when the model has them (default).
        variance: ddpm's noise: "beta" (sigma_t^2 = beta_t) or "posterior"; default
            ``config["sampling"]["variance"]`` (a diffusers scheduler's variance_type), else
            "beta".
        eta: ddim's noise scale: 0 deterministic (default), 1 DDPM-like.
        clip_x0: clamp the predicted x0 to [-1, 1] at each step.  Default: True for ddim,
            False for ddpm (Algorithm 20.2 exactly) and dpm++2m (diffusers' default
            thresholding=False); True for ddpm takes the posterior mean at the clamped x0
            (improved-diffusion's ``clip_denoised``).  For ddpm the default is
            ``config["sampling"]["clip_x0"]`` when recorded (a diffusers clip_sample).
        clip_rule: ddim with clip_x0: ``"rederive"`` (default) re-derives eps from the clamped
            x0, eps = (z_t - sqrt(alpha_t) x0) / sqrt(1 - alpha_t), as improved-diffusion does
            (quality improves with more steps); ``"diffusers"`` keeps the model's eps, as
            diffusers' DDIMScheduler(clip_sample=True) does (drifts as steps grow).
        cuda_graph: on CUDA, capture one denoising step as a CUDA graph and replay it T times;
            False runs the same step eagerly.  Where the step cannot be captured (the torch
            reference backend, a model that reads tensors on the host) it runs eagerly after
            one log line.  Ignored on CPU (always eager).
        strict: raise ``GraphCaptureError`` instead of that fallback (None: the
            ``FASTDIFF_STRICT`` environment variable, off by default).
        precision: autocast for the model ("auto", "fp32", "bf16", "fp16"); default "auto":
            the fastest for the sampling device (see fastdiff.precision).  bf16 on CUDA runs
            a fastdiff UNet from a cached bf16 copy of its weights (fastdiff.low_precision).
        channels_last: memory layout of the latents (default: auto, as for training).
        device: move the model there first (default: where it is).
        progress: show a tqdm progress bar.
        latents: start from these z_T (n, C, H, W), a floating tensor on the sampling device
            (diffusers' ``latents=``), instead of noise drawn from ``seed``; any sampler.
        labels: a class-conditional model's class for every image: an int, or n ints in
            0..num_classes-1; None: the null class (the unconditional model).
        guidance_scale: classifier-free guidance s, eps = eps_u + s (eps_c - eps_u) (1: the
            conditional model alone, 0: the unconditional one); default
            ``samplers.DEFAULT_GUIDANCE_SCALE``.  For s != 1 each step runs the model once on
            2B rows (conditional and null) and the fused step forms the guided eps.
    Returns:
        float32 tensor (n, C, H, W) on the model's device, clamped to [-1, 1].
    """
    return torch.cat(list(iter_samples(**dict(locals()))))


def iter_samples(
    diffusion_or_path,
    n: int,
    *,
    steps: int | None = None,
    sampler: str | SamplerSpec = "ddpm",
    seed: int | None = None,
    batch_size: int | None = None,
    use_ema: bool = True,
    variance: str | None = None,
    eta: float | None = None,
    clip_x0: bool | None = None,
    clip_rule: str | None = None,
    cuda_graph: bool = True,
    precision: str | None = None,
    channels_last=None,
    device=None,
    progress: bool = False,
    strict: bool | None = None,
    latents: torch.Tensor | None = None,
    labels=None,
    guidance_scale: float | None = None,
) -> Iterator[torch.Tensor]:
    """:func:`sample`'s images batch by batch, each drawn only when asked for: the same
    arguments give the same images, as (b, C, H, W) float32 batches of ``batch_size`` (the
    last one smaller) on the model's device.  For a caller that reduces each batch (FID
    features), so n images are never held at once.  The arguments are checked when the first
    batch is asked for, before any sampling."""
    diffusion = (
        diffusion_or_path
        if isinstance(diffusion_or_path, Diffusion)
        else load(diffusion_or_path, device=device)
    )
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    batch_size = check_run_args(n, batch_size, seed, diffusion.schedule.T)
    spec = sampler_spec(sampler, diffusion.schedule.T, steps=steps, eta=eta, clip_x0=clip_x0,
                        clip_rule=clip_rule, variance=variance)  # fmt: skip
    spec = spec.for_model(diffusion.sampling_default)
    labels, guidance = check_guidance_args(diffusion.num_classes, labels, guidance_scale, n)
    strict = cuda_graphs.strict_mode(strict)
    if device is not None:
        diffusion.to(resolve_device(device))
    dev = diffusion.device
    if latents is not None:
        check_latents(latents, n, diffusion.image_shape, dev)
    prec = resolve_precision(precision or "auto", dev)
    cl = resolve_channels_last(channels_last, dev, prec)
    net = diffusion.ema_model if use_ema and diffusion.ema_model is not None else diffusion.model
    net = sampling_model(net, prec, dev, cl)  # a UNet in bf16 on CUDA: its cached bf16 copy
    if cl:
        to_channels_last(net)
    was_training = net.training
    net.eval()
    try:
        runner = SamplerRunner(
            net, diffusion.schedule, spec, precision=prec, channels_last=cl, guidance=guidance
        )
        yield from iter_sampler(
            runner,
            n,
            diffusion.image_shape,
            dev,
            seed=seed,
            batch_size=batch_size,
            cuda_graph=cuda_graph,
            progress=progress,
            strict=strict,
            latents=latents,
            labels=labels,
        )
    finally:
        net.train(was_training)


def sampler_spec(sampler, T: int, **options) -> SamplerSpec:
    """``sampler`` if it is a SamplerSpec (then every option must be None), else the validated
    SamplerSpec of the name and options; checked against a schedule of T steps."""
    if isinstance(sampler, SamplerSpec):
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ValueError(
                f"{given[0]}: leave it unset when sampler is a SamplerSpec (it holds it)"
            )
        return sampler.check_T(T)
    return SamplerSpec.checked(name=sampler, T=T, **options)
