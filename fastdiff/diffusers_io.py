"""Local diffusers directories in and out: DDPMPipeline and UNet2DModel folders <-> Diffusion.

Reading (``fastdiff.load`` calls :func:`load_diffusers` for such a directory)::

    pipeline:   model_index.json, unet/config.json, unet/diffusion_pytorch_model.safetensors,
                scheduler/scheduler_config.json
    UNet2DModel: config.json ("_class_name": "UNet2DModel") + diffusion_pytorch_model.safetensors,
                with the scheduler config given (``scheduler=``), beside it
                (scheduler_config.json) or in ../scheduler/ (the unet/ folder of a pipeline)

A UNet2DModel of the DDPM family is converted into fastdiff's UNet (see
fastdiff.diffusers_convert), so the fused kernels and the CUDA graph apply; any other
UNet2DModel is wrapped as :class:`DiffusersUNet` (needs diffusers installed).  Either way
sampling runs fastdiff's fused reverse step.  The scheduler config gives the schedule and the
sampling defaults recorded in ``Diffusion.config["sampling"]``.

Writing: :func:`save_pipeline` (``Diffusion.save(path, format="diffusers")``,
``fastdiff export``) writes a DDPMPipeline directory that
``diffusers.DDPMPipeline.from_pretrained`` loads.

Only safetensors and json are needed, except to wrap a model that fastdiff cannot convert;
this module never imports diffusers otherwise.  Local paths only: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from . import checkpoint as ckpt
from . import diffusers_convert as convert
from .atomic import default_mode
from .errors import CheckpointError, FastDiffError

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_CLASS = "UNet2DModel"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"diffusers: {str(path)!r} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"diffusers: {str(path)!r} does not hold a JSON object")
    return data


def detect(path: str | Path) -> str | None:
    """The diffusers layout in ``path``: "pipeline" (a model_index.json), "unet" (the
    config.json of a UNet2DModel) or None (not a diffusers directory).

    A config.json of another diffusers class raises a CheckpointError naming it.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / MODEL_INDEX).is_file():
        return "pipeline"
    if (path / CONFIG).is_file():
        cls = _read_json(path / CONFIG).get("_class_name")
        if cls == UNET_CLASS:
            return "unet"
        if cls is not None:
            raise CheckpointError(
                f"diffusers: {str(path)!r} holds a {cls}; fastdiff loads {UNET_CLASS} (DDPM)"
                " models and DDPMPipeline directories"
            )
    return None


def _pipeline_parts(path: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler config) of a pipeline directory."""
    index = _read_json(path / MODEL_INDEX)
    parts = {
        k: v for k, v in index.items() if not k.startswith("_") and v not in (None, [None, None])
    }
    if set(parts) != {"unet", "scheduler"}:
        raise CheckpointError(
            f"diffusers: {str(path)!r} is a {index.get('_class_name', 'pipeline')} with"
            f" components {sorted(parts)}; fastdiff loads pixel-space DDPM pipelines (exactly a"
            " 'unet' and a 'scheduler')"
        )
    unet_cls = parts["unet"][-1] if isinstance(parts["unet"], list) else parts["unet"]
    if unet_cls != UNET_CLASS:
        raise CheckpointError(
            f"diffusers: the pipeline in {str(path)!r} has a {unet_cls} unet; fastdiff loads"
            f" {UNET_CLASS}"
        )
    return path / "unet", path / "scheduler" / SCHEDULER_CONFIG


def _scheduler_path(unet_dir: Path, scheduler: str | Path | None) -> Path:
    if scheduler is not None:
        given = Path(scheduler)
        given = given / SCHEDULER_CONFIG if given.is_dir() else given
        if not given.is_file():
            raise CheckpointError(f"scheduler: {str(given)!r} does not exist")
        return given
    for candidate in (
        unet_dir / SCHEDULER_CONFIG,
        unet_dir.parent / "scheduler" / SCHEDULER_CONFIG,
    ):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"diffusers: no scheduler config for the {UNET_CLASS} in {str(unet_dir)!r}: put"
        f" {SCHEDULER_CONFIG} beside it or in ../scheduler/, or pass scheduler=PATH"
    )


def read_unet_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The UNet2DModel weights in ``unet_dir``: one safetensors file, or shards listed in
    ``diffusion_pytorch_model.safetensors.index.json``."""
    single, index = unet_dir / WEIGHTS, unet_dir / f"{WEIGHTS}.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(unet_dir / shard)))
            return state
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"diffusers: cannot read the weights in {str(unet_dir)!r}: {exc}"
        ) from exc
    raise CheckpointError(
        f"diffusers: {str(unet_dir)!r} has no {WEIGHTS} (fastdiff reads safetensors; resave a"
        " .bin model with diffusers: UNet2DModel.from_pretrained(dir).save_pretrained(dir))"
    )


def _import_diffusers(why: str):
    try:
        import diffusers
    except ImportError as exc:
        raise CheckpointError(
            f"diffusers: {why}; that needs diffusers: pip install 'fastdiff[diffusers]'"
        ) from exc
    return diffusers


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel as fastdiff's denoiser: ``forward(z, t)`` -> eps (B, C, H, W).

    ``z``: (B, C, H, W); ``t``: (B,) 0-based step indices (diffusers' timesteps) or a scalar.
    ``config`` is the UNet2DModel config (JSON-serialisable), so fastdiff checkpoints of a
    wrapped model can be rebuilt (:meth:`from_config`).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.config = {
            k: v
            for k, v in json.loads(json.dumps(dict(unet.config))).items()
            if not k.startswith("_")
        }

    @classmethod
    def from_pretrained(cls, unet_dir: Path, why: str = "this model is wrapped") -> DiffusersUNet:
        diffusers = _import_diffusers(why)
        try:
            unet = diffusers.UNet2DModel.from_pretrained(
                str(unet_dir), local_files_only=True, low_cpu_mem_usage=False
            )
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"diffusers: cannot load {str(unet_dir)!r}: {first}") from exc
        return cls(unet)

    @classmethod
    def from_config(cls, config: dict) -> DiffusersUNet:
        diffusers = _import_diffusers("the checkpoint holds a wrapped diffusers UNet2DModel")
        return cls(diffusers.UNet2DModel.from_config(config))

    @property
    def num_classes(self) -> int | None:
        """A class-conditional UNet2DModel's classes: num_class_embeds - 1 (the last
        embedding is taken as the null class, fastdiff's export convention)."""
        embeds = self.config.get("num_class_embeds")
        return None if embeds is None else embeds - 1

    def forward(self, z: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device)
        if t.dim() == 0:
            t = t.expand(z.shape[0])
        if y is None and self.num_classes is not None:
            y = torch.full((z.shape[0],), self.num_classes, device=z.device)
        return self.unet(z, t, class_labels=y, return_dict=False)[0]


def load_diffusers(path: str | Path, *, scheduler: str | Path | None = None, device=None):
    """A Diffusion from a local diffusers DDPMPipeline or UNet2DModel directory.

    The model is fastdiff's UNet with converted weights when the configuration is of the DDPM
    family, else the wrapped diffusers module.  There are no separate EMA weights (a pipeline
    holds one set).  ``config["sampling"]`` records the scheduler's variance ("beta" for
    fixed_large, "posterior" for fixed_small) and clip_sample, which ``sample`` uses as its
    defaults; ``config["diffusers"]`` records where it came from and how.
    """
    from .diffusion import Diffusion, _load_into
    from .precision import resolve_device
    from .unet import UNet

    path = Path(path)
    kind = detect(path)
    if kind is None:
        raise CheckpointError(
            f"diffusers: {str(path)!r} is neither a diffusers pipeline ({MODEL_INDEX}) nor a"
            f" {UNET_CLASS} folder ({CONFIG})"
        )
    if kind == "pipeline":
        unet_dir, sched_path = _pipeline_parts(path)
        if scheduler is not None:
            sched_path = _scheduler_path(unet_dir, scheduler)
    else:
        unet_dir, sched_path = path, _scheduler_path(path, scheduler)
    if not (unet_dir / CONFIG).is_file():
        raise CheckpointError(f"diffusers: {str(unet_dir / CONFIG)!r} is missing")
    unet_config = _read_json(unet_dir / CONFIG)
    if unet_config.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise CheckpointError(
            f"diffusers: {str(unet_dir)!r} holds a {unet_config['_class_name']}; fastdiff loads"
            f" {UNET_CLASS}"
        )
    if not sched_path.is_file():
        raise CheckpointError(f"diffusers: {str(sched_path)!r} is missing")
    sched_config = _read_json(sched_path)
    schedule, sampling = convert.schedule_from_scheduler_config(sched_config)
    image_shape = convert.image_shape_from_unet_config(unet_config)

    record: dict[str, Any] = {"path": str(path)}
    try:
        fd_config = convert.unet_config_from_diffusers(unet_config)
        net = UNet(**fd_config)
    except (convert.NotExpressible, FastDiffError) as exc:
        why = f"this {UNET_CLASS} is outside the DDPM family fastdiff converts ({exc})"
        net = DiffusersUNet.from_pretrained(unet_dir, why=f"{why} and is used wrapped")
        record.update(unet="wrapped", reason=str(exc))
    else:
        state = convert.state_dict_from_diffusers(read_unet_weights(unet_dir), fd_config)
        _load_into(net, state, unet_dir)
        record.update(unet="converted")
    record.update(unet_config=unet_config, scheduler_config=sched_config)
    net.to(resolve_device(device)).eval()
    config = {"sampling": sampling, "diffusers": json.loads(json.dumps(record))}
    return Diffusion(net, schedule, image_shape, config=config)


# -- writing ---------------------------------------------------------------------------------


def _unet_for_export(net: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(UNet2DModel config.json, its weights as contiguous fp32 CPU tensors) of ``net``."""
    from .unet import UNet

    if isinstance(net, UNet):
        config = convert.unet_config_to_diffusers(net.config)
        state = convert.state_dict_to_diffusers(net.state_dict(), net.config)
    elif isinstance(net, DiffusersUNet):
        config = {
            "_class_name": UNET_CLASS,
            "_diffusers_version": convert.DIFFUSERS_VERSION,
            **net.config,
        }
        state = net.unet.state_dict()
    else:
        raise CheckpointError(
            f"export: a diffusers pipeline holds a {UNET_CLASS}; this model is a"
            f" {type(net).__name__} (fastdiff's UNet or a wrapped {UNET_CLASS} can be exported)"
        )
    # Copies without shared storage (safetensors refuses aliases, e.g. diffusers' Conv2d_0/conv).
    weights = {
        k: v.float() if v.is_floating_point() else v for k, v in ckpt._weights(state).items()
    }
    return config, weights


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def save_pipeline(diffusion, directory: str | Path, *, use_ema: bool = True) -> Path:
    """Write ``diffusion`` as a DDPMPipeline directory (model_index.json, unet/, scheduler/).

    The UNet gets the EMA weights when ``use_ema`` and the Diffusion has them, else the raw
    weights.  The DDPMScheduler reproduces the schedule and fastdiff's sampling defaults
    (variance -> variance_type, clip_x0 -> clip_sample; False for fastdiff's own models, so
    diffusers' loop runs Algorithm 20.2 exactly).  ``directory`` must not exist or be empty;
    it appears complete or not at all (written beside it, then renamed).
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(
            f"export: {str(directory)!r} already exists and is not empty; choose a new directory"
        )
    net = diffusion.ema_model if use_ema and diffusion.ema_model is not None else diffusion.model
    unet_config, weights = _unet_for_export(net)
    scheduler_config = convert.scheduler_config_for(
        diffusion.schedule,
        variance=diffusion.sampling_default("variance", "beta"),
        clip_x0=diffusion.sampling_default("clip_x0", False),
    )
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": convert.DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", UNET_CLASS],
    }
    files = {
        MODEL_INDEX: _json_bytes(index),
        f"unet/{CONFIG}": _json_bytes(unet_config),
        f"unet/{WEIGHTS}": save(weights, metadata={"format": "pt"}),
        f"scheduler/{SCHEDULER_CONFIG}": _json_bytes(scheduler_config),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        for sub in (tmp, tmp / "unet", tmp / "scheduler"):
            sub.mkdir(exist_ok=True)
            os.chmod(sub, default_mode(directory=True))
        for name, data in files.items():
            ckpt._write_file(tmp / name, data)  # written and fsynced
        os.replace(tmp, directory)  # also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
