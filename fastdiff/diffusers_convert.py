"""diffusers' DDPM components <-> fastdiff's, as plain dicts and tensors (no files, no diffusers).

Three mappings, each in both directions:

* ``UNet2DModel`` config  <-> :class:`fastdiff.UNet` config: :func:`unet_config_from_diffusers`,
  :func:`unet_config_to_diffusers`.  fastdiff's UNet is the DDPM U-Net that diffusers builds
  from ``DownBlock2D`` / ``AttnDownBlock2D`` / ``UpBlock2D`` / ``AttnUpBlock2D``,
  ``UNetMidBlock2D`` with attention, ``ResnetBlock2D`` with the default ("add") time
  embedding, positional time embedding, SiLU and conv resampling.  A configuration outside
  that family raises :class:`NotExpressible` (the caller then wraps the diffusers module).
* ``UNet2DModel`` weights <-> UNet ``state_dict``: :func:`state_dict_from_diffusers`,
  :func:`state_dict_to_diffusers`.  Names map one to one except attention, where diffusers'
  ``to_q``, ``to_k``, ``to_v`` Linear layers (C, C) are fastdiff's one ``qkv`` 1x1 conv
  (3C, C, 1, 1), concatenated in that order, and ``to_out.0`` (C, C) is ``proj_out``
  (C, C, 1, 1).  The pre-0.12 attention names (``query``, ``key``, ``value``,
  ``proj_attn``), which older checkpoints such as google/ddpm-cifar10-32 still hold, are read
  too.
* ``DDPMScheduler`` config <-> :class:`fastdiff.NoiseSchedule` plus the sampling defaults:
  :func:`schedule_from_scheduler_config`, :func:`scheduler_config_for`.

Conventions (diffusers' name = fastdiff's UNet option): ``norm_eps`` = ``norm_eps``,
``downsample_padding`` = ``downsample_padding``, ``flip_sin_to_cos`` / ``freq_shift`` =
the same names; ``layers_per_block`` = ``num_res_blocks``; ``block_out_channels[i]`` =
``base_channels * channel_mult[i]``; an ``AttnDownBlock2D`` at level i = attention at
resolution ``image_size / 2**i``; ``attention_head_dim`` None = one head;
``num_class_embeds`` = ``num_classes + 1`` (a class-conditional UNet: its
``class_embedding`` rows are fastdiff's ``class_embed`` rows, the last one the null class of
classifier-free guidance; a diffusers model with K embeddings loads as ``num_classes=K-1``).
Step indices are 0-based on both sides (diffusers' ``timesteps`` are fastdiff's ``t``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .schedule import NoiseSchedule

#: The oldest diffusers release whose config layout we write (informational in diffusers).
DIFFUSERS_VERSION = "0.30.0"

#: ``UNet2DModel.__init__`` defaults (diffusers 0.30 - 0.42): what a config.json that omits a
#: key means.
UNET_DEFAULTS: dict[str, Any] = dict(
    sample_size=None,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    time_embedding_dim=None,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=1,
    downsample_type="conv",
    upsample_type="conv",
    dropout=0.0,
    act_fn="silu",
    attention_head_dim=8,
    norm_num_groups=32,
    attn_norm_num_groups=None,
    norm_eps=1e-5,
    resnet_time_scale_shift="default",
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=None,
    num_train_timesteps=None,
)

#: ``DDPMScheduler.__init__`` defaults, for the same reason.
SCHEDULER_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    variance_type="fixed_small",
    clip_sample=True,
    prediction_type="epsilon",
    thresholding=False,
    clip_sample_range=1.0,
    timestep_spacing="leading",
    steps_offset=0,
    rescale_betas_zero_snr=False,
)

#: diffusers ``variance_type`` -> fastdiff ``variance``.  ``fixed_small_log`` draws the same
#: sigma as ``fixed_small`` (exp(0.5 log var)); the learned types need a variance output and
#: ``fixed_large_log`` is only meaningful for likelihoods, so they are refused.
VARIANCE_FROM_DIFFUSERS = {
    "fixed_large": "beta",
    "fixed_small": "posterior",
    "fixed_small_log": "posterior",
}
VARIANCE_TO_DIFFUSERS = {"beta": "fixed_large", "posterior": "fixed_small"}

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


class NotExpressible(ValueError):
    """A UNet2DModel configuration that fastdiff's UNet cannot reproduce (the reason is the
    message); the model can still be used wrapped."""


# -- UNet2DModel config <-> UNet config ------------------------------------------------------


def _block_kind(name: str, kinds: dict[str, bool], field: str) -> bool:
    """Whether block type ``name`` has attention; diffusers accepts a "UNetRes" prefix."""
    base = name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name
    if base not in kinds:
        raise NotExpressible(f"{field} contains {name!r} (fastdiff's UNet has {sorted(kinds)})")
    return kinds[base]


def image_shape_from_unet_config(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the images a UNet2DModel config describes (``in_channels``,
    ``sample_size``: an int or [H, W])."""
    cfg = {**UNET_DEFAULTS, **config}
    size = cfg["sample_size"]
    if isinstance(size, int) and not isinstance(size, bool):
        h = w = size
    elif (
        isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size)
    ):
        h, w = size
    else:
        raise CheckpointError(
            f"diffusers: the UNet2DModel config has sample_size={size!r}; fastdiff needs the"
            " image size (an int or [height, width])"
        )
    if cfg["out_channels"] != cfg["in_channels"]:
        raise CheckpointError(
            f"diffusers: the UNet2DModel has out_channels={cfg['out_channels']} and"
            f" in_channels={cfg['in_channels']}; fastdiff needs an eps prediction shaped like"
            " its input (a model that also predicts the variance is not supported)"
        )
    return int(cfg["in_channels"]), int(h), int(w)


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """fastdiff ``UNet(**result)`` for a UNet2DModel config (its config.json as a dict).

    Raises NotExpressible, naming the first field outside the DDPM family.
    """
    cfg = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    channels, height, _ = image_shape_from_unet_config(cfg)
    block_out = [int(c) for c in cfg["block_out_channels"]]
    base = block_out[0]
    required = dict(
        center_input_sample=False,
        time_embedding_type="positional",
        act_fn="silu",
        mid_block_type="UNetMidBlock2D",
        mid_block_scale_factor=1,
        downsample_type="conv",
        upsample_type="conv",
        add_attention=True,
        class_embed_type=None,
    )
    for key, want in required.items():
        if cfg[key] != want:
            raise NotExpressible(f"{key}={cfg[key]!r} (fastdiff's UNet has {want!r})")
    shift = cfg["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise NotExpressible(
            f"resnet_time_scale_shift={shift!r} (fastdiff's UNet has 'default' or 'scale_shift')"
        )
    embeds = cfg["num_class_embeds"]
    if embeds is not None and (not isinstance(embeds, int) or embeds < 2):
        raise NotExpressible(
            f"num_class_embeds={embeds!r} (fastdiff's UNet has at least one class and the null"
            " class)"
        )
    if cfg["time_embedding_dim"] not in (None, 4 * base):
        raise NotExpressible(
            f"time_embedding_dim={cfg['time_embedding_dim']!r} (fastdiff's UNet has"
            f" 4 * block_out_channels[0] = {4 * base})"
        )
    if any(c % base for c in block_out):
        raise NotExpressible(
            f"block_out_channels={block_out} are not all multiples of the first"
            " (fastdiff's UNet has base_channels * channel_mult)"
        )
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if not (len(down) == len(up) == len(block_out)):
        raise NotExpressible(
            f"down_block_types, up_block_types and block_out_channels have lengths"
            f" {len(down)}, {len(up)}, {len(block_out)}"
        )
    attn_down = [_block_kind(b, _DOWN, "down_block_types") for b in down]
    attn_up = [_block_kind(b, _UP, "up_block_types") for b in up]
    if attn_up != attn_down[::-1]:
        raise NotExpressible(
            f"up_block_types={up} do not mirror down_block_types={down} (fastdiff's UNet has"
            " attention at the same resolutions on both paths)"
        )
    groups = cfg["norm_num_groups"]
    if cfg["attn_norm_num_groups"] not in (None, groups):
        raise NotExpressible(
            f"attn_norm_num_groups={cfg['attn_norm_num_groups']!r} differs from"
            f" norm_num_groups={groups!r}"
        )
    if shift == "scale_shift" and cfg["attn_norm_num_groups"] is None:
        # UNetMidBlock2D gives its attention a GroupNorm only for "default" unless told.
        raise NotExpressible(
            "resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None: the middle"
            " block's attention has no GroupNorm (fastdiff's UNet has one)"
        )
    widths = sorted({c for c, a in zip(block_out, attn_down, strict=True) if a} | {block_out[-1]})
    head_dim = cfg["attention_head_dim"]
    if head_dim is None:
        heads = 1
    else:
        counts = {w // head_dim for w in widths}
        if any(w % head_dim for w in widths) or len(counts) != 1:
            raise NotExpressible(
                f"attention_head_dim={head_dim} gives a different or fractional number of heads"
                f" at the attention widths {widths} (fastdiff's UNet has one head count)"
            )
        heads = counts.pop()
    out = dict(
        in_channels=channels,
        out_channels=channels,
        base_channels=base,
        channel_mult=[c // base for c in block_out],
        num_res_blocks=int(cfg["layers_per_block"]),
        attention_resolutions=[height // 2**i for i, a in enumerate(attn_down) if a],
        dropout=float(cfg["dropout"]),
        image_size=height,
        num_groups=groups,
        num_heads=heads,
        norm_eps=float(cfg["norm_eps"]),
        downsample_padding=cfg["downsample_padding"],
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"],
        num_classes=None if embeds is None else embeds - 1,
        scale_shift_norm=shift == "scale_shift",
    )
    if out["downsample_padding"] not in (0, 1) or out["freq_shift"] not in (0, 1):
        raise NotExpressible(
            f"downsample_padding={out['downsample_padding']!r}, freq_shift="
            f"{out['freq_shift']!r} (fastdiff's UNet has 0 or 1 for each)"
        )
    return out


def unet_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The UNet2DModel config.json (a dict) of a fastdiff UNet config (``UNet.config``).

    Raises CheckpointError when diffusers cannot express it (several heads whose head width
    differs between levels: diffusers has one ``attention_head_dim``).
    """
    from .unet import UNet

    with torch.device("meta"):  # fills in defaults and validates, allocating nothing
        cfg = UNet(**config).config
    base, mult = cfg["base_channels"], cfg["channel_mult"]
    size = cfg["image_size"]
    attn = [size // 2**i in cfg["attention_resolutions"] for i in range(len(mult))]
    block_out = [base * m for m in mult]
    widths = sorted({c for c, a in zip(block_out, attn, strict=True) if a} | {block_out[-1]})
    if cfg["num_heads"] == 1:
        head_dim = None
    elif len(widths) == 1:
        head_dim = widths[0] // cfg["num_heads"]
    else:
        raise CheckpointError(
            f"export: num_heads={cfg['num_heads']} at the attention widths {widths} gives"
            " different head widths, and diffusers' UNet2DModel has one attention_head_dim"
        )
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **UNET_DEFAULTS,
        "sample_size": size,
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "freq_shift": cfg["freq_shift"],
        "flip_sin_to_cos": cfg["flip_sin_to_cos"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        "block_out_channels": block_out,
        "layers_per_block": cfg["num_res_blocks"],
        "downsample_padding": cfg["downsample_padding"],
        "dropout": cfg["dropout"],
        "attention_head_dim": head_dim,
        "norm_num_groups": cfg["num_groups"],
        "norm_eps": cfg["norm_eps"],
        "num_class_embeds": None if cfg["num_classes"] is None else cfg["num_classes"] + 1,
        # scale_shift needs the middle attention's GroupNorm named (see the import above).
        **(
            {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": cfg["num_groups"]}
            if cfg["scale_shift_norm"]
            else {}
        ),
    }


# -- weights ---------------------------------------------------------------------------------

#: ResnetBlock2D <-> ResBlock sub-module names (fastdiff, diffusers).
_RES = [
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("temb_proj", "time_emb_proj"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("skip", "conv_shortcut"),  # only when the channel count changes
]
_QKV = ("to_q", "to_k", "to_v")
_QKV_LEGACY = ("query", "key", "value")


def _module_pairs(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(fastdiff prefix, diffusers prefix, kind) for every module with weights, in model order.

    kind: "plain" (same parameter names), "res" (ResBlock), "attn" (AttnBlock), "embed"
    (an Embedding: weight only).
    """
    mult, n = config["channel_mult"], config["num_res_blocks"]
    levels = len(mult)
    size = config["image_size"]
    attn = [size // 2**i in config["attention_resolutions"] for i in range(levels)]
    pairs = [
        ("conv_in", "conv_in", "plain"),
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
    ]
    if config.get("num_classes") is not None:
        pairs.append(("class_embed", "class_embedding", "embed"))
    for level in range(levels):
        for j in range(n):
            pairs.append((f"down.{level}.blocks.{j}", f"down_blocks.{level}.resnets.{j}", "res"))
            if attn[level]:
                pairs.append(
                    (f"down.{level}.attns.{j}", f"down_blocks.{level}.attentions.{j}", "attn")
                )
        if level != levels - 1:
            pairs.append(
                (
                    f"down.{level}.downsample.conv",
                    f"down_blocks.{level}.downsamplers.0.conv",
                    "plain",
                )
            )
    pairs += [
        ("mid_block1", "mid_block.resnets.0", "res"),
        ("mid_attn", "mid_block.attentions.0", "attn"),
        ("mid_block2", "mid_block.resnets.1", "res"),
    ]
    for k, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            pairs.append((f"up.{k}.blocks.{j}", f"up_blocks.{k}.resnets.{j}", "res"))
            if attn[level]:
                pairs.append((f"up.{k}.attns.{j}", f"up_blocks.{k}.attentions.{j}", "attn"))
        if level != 0:
            pairs.append((f"up.{k}.upsample.conv", f"up_blocks.{k}.upsamplers.0.conv", "plain"))
    pairs += [("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain")]
    return pairs


class _Source:
    """A state dict that is consumed key by key, so leftovers can be reported."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str):
        self.state, self.what = dict(state), what

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, *aliases: str) -> torch.Tensor:
        for name in (key, *aliases):
            if name in self.state:
                return self.state.pop(name)
        raise CheckpointError(f"{self.what}: weight {key!r} is missing")

    def finish(self) -> None:
        if self.state:
            extra = sorted(self.state)
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise CheckpointError(
                f"{self.what}: unexpected weights {', '.join(extra[:3])}{more} (not a"
                " UNet2DModel of this configuration)"
            )


def _as_linear(w: torch.Tensor, key: str) -> torch.Tensor:
    """A (C_out, C_in) Linear weight from a Linear or a 1x1 conv weight."""
    if w.dim() == 4 and w.shape[2:] == (1, 1):
        return w[:, :, 0, 0]
    if w.dim() != 2:
        raise CheckpointError(f"diffusers weights: {key!r} has shape {tuple(w.shape)}")
    return w


def _renamed_keys(f: str, d: str, kind: str, has_skip: bool):
    """(fastdiff key, diffusers key) of every tensor that moves unchanged between the two
    layouts in module pair (f, d) of ``_module_pairs``; an attention block's q/k/v and output
    projection change shape and are converted by the callers."""
    if kind == "embed":
        yield f"{f}.weight", f"{d}.weight"
        return
    if kind == "plain":
        subs = [("", "")]
    elif kind == "res":
        subs = [(f".{fs}", f".{ds}") for fs, ds in _RES if fs != "skip" or has_skip]
    else:
        subs = [(".norm", ".group_norm")]
    for fs, ds in subs:
        for p in ("weight", "bias"):
            yield f"{f}{fs}.{p}", f"{d}{ds}.{p}"


def state_dict_from_diffusers(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A fastdiff UNet state_dict (for ``UNet(**config)``) from UNet2DModel weights."""
    src = _Source(state, "diffusers weights")
    out: dict[str, torch.Tensor] = {}
    for f, d, kind in _module_pairs(config):
        for fk, dk in _renamed_keys(f, d, kind, src.has(f"{d}.conv_shortcut.weight")):
            out[fk] = src.take(dk)
        if kind != "attn":
            continue
        names = list(zip(_QKV, _QKV_LEGACY, strict=True))
        q, k, v = (
            _as_linear(src.take(f"{d}.{new}.weight", f"{d}.{old}.weight"), f"{d}.{new}")
            for new, old in names
        )
        out[f"{f}.qkv.weight"] = torch.cat([q, k, v])[:, :, None, None]
        out[f"{f}.qkv.bias"] = torch.cat(
            [src.take(f"{d}.{new}.bias", f"{d}.{old}.bias") for new, old in names]
        )
        w = src.take(f"{d}.to_out.0.weight", f"{d}.proj_attn.weight")
        out[f"{f}.proj_out.weight"] = _as_linear(w, f"{d}.to_out.0")[:, :, None, None]
        out[f"{f}.proj_out.bias"] = src.take(f"{d}.to_out.0.bias", f"{d}.proj_attn.bias")
    src.finish()
    return out


def state_dict_to_diffusers(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """UNet2DModel weights (current diffusers names) from a fastdiff UNet state_dict."""
    src = _Source(state, "fastdiff weights")
    out: dict[str, torch.Tensor] = {}
    for f, d, kind in _module_pairs(config):
        for fk, dk in _renamed_keys(f, d, kind, src.has(f"{f}.skip.weight")):
            out[dk] = src.take(fk)
        if kind != "attn":
            continue
        w = src.take(f"{f}.qkv.weight")
        b = src.take(f"{f}.qkv.bias")
        for name, wi, bi in zip(_QKV, w.flatten(1).chunk(3), b.chunk(3), strict=True):
            out[f"{d}.{name}.weight"] = wi
            out[f"{d}.{name}.bias"] = bi
        out[f"{d}.to_out.0.weight"] = src.take(f"{f}.proj_out.weight").flatten(1)
        out[f"{d}.to_out.0.bias"] = src.take(f"{f}.proj_out.bias")
    src.finish()
    return out


# -- DDPMScheduler config <-> NoiseSchedule --------------------------------------------------


def _refuse(field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"diffusers scheduler: {field}={value!r} is not supported: {why}")


def schedule_from_scheduler_config(config: Mapping[str, Any]) -> tuple[NoiseSchedule, dict]:
    """The NoiseSchedule and sampling defaults ``{"variance", "clip_x0"}`` a DDPMScheduler
    config (scheduler_config.json as a dict) describes.

    Betas: ``trained_betas`` when given, else ``beta_schedule`` "linear" (``beta_start`` to
    ``beta_end``), "scaled_linear" (linear in sqrt(beta)) or "squaredcos_cap_v2" (fastdiff's
    cosine) over ``num_train_timesteps``, computed in float64.  Refused with a CheckpointError
    naming the field: ``prediction_type`` other than "epsilon", a ``variance_type`` fastdiff
    has no sampler for, ``thresholding``, ``clip_sample_range`` other than 1, zero-SNR
    rescaling (beta_T = 1), other beta schedules.
    """
    cls = config.get("_class_name")
    if cls not in (None, "DDPMScheduler", "DDIMScheduler"):
        raise _refuse("_class_name", cls, "fastdiff reads DDPMScheduler and DDIMScheduler configs")
    cfg = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cfg["prediction_type"] != "epsilon":
        raise _refuse(
            "prediction_type", cfg["prediction_type"], "fastdiff models predict the noise (epsilon)"
        )
    variance_type = cfg["variance_type"]
    if variance_type not in VARIANCE_FROM_DIFFUSERS:
        raise _refuse(
            "variance_type",
            variance_type,
            f"fastdiff samples with {sorted(VARIANCE_FROM_DIFFUSERS)} (sigma^2 = beta or the"
            " posterior variance)",
        )
    if cfg["thresholding"]:
        raise _refuse("thresholding", True, "fastdiff has no dynamic thresholding")
    if cfg["clip_sample"] and cfg["clip_sample_range"] != 1.0:
        raise _refuse("clip_sample_range", cfg["clip_sample_range"], "fastdiff clips x0 to [-1, 1]")
    if cfg["rescale_betas_zero_snr"]:
        raise _refuse("rescale_betas_zero_snr", True, "it makes beta_T = 1 (zero terminal SNR)")
    T = cfg["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise _refuse("num_train_timesteps", T, "expected a positive integer")
    try:
        schedule = _betas(cfg, T)
    except ValueError as exc:
        raise CheckpointError(f"diffusers scheduler: {exc}") from exc
    sampling = {
        "variance": VARIANCE_FROM_DIFFUSERS[variance_type],
        "clip_x0": bool(cfg["clip_sample"]),
    }
    return schedule, sampling


def _betas(cfg: Mapping[str, Any], T: int) -> NoiseSchedule:
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        if betas.shape != (T,):
            raise ValueError(f"trained_betas has {betas.size} values but num_train_timesteps={T}")
        return NoiseSchedule(betas, name="custom")
    kind, start, end = cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"]
    if kind == "linear":
        return NoiseSchedule.linear(T, start, end)
    if kind == "scaled_linear":
        betas = np.linspace(math.sqrt(start), math.sqrt(end), T, dtype=np.float64) ** 2
        return NoiseSchedule(betas, name="scaled_linear")
    if kind == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(T)
    raise ValueError(
        f"beta_schedule={kind!r} is not supported (fastdiff reads linear, scaled_linear,"
        " squaredcos_cap_v2 or trained_betas)"
    )


def scheduler_config_for(
    schedule: NoiseSchedule, *, variance: str = "beta", clip_x0: bool = False
) -> dict[str, Any]:
    """The DDPMScheduler config (a dict) that reproduces ``schedule`` and fastdiff's DDPM
    sampler with ``variance`` and ``clip_x0``.

    The betas are written as a named ``beta_schedule`` when that recomputes them to 1e-12
    (linear, scaled_linear, squaredcos_cap_v2), else as ``trained_betas``.
    """
    if variance not in VARIANCE_TO_DIFFUSERS:
        raise ValueError(
            f"variance: expected one of {sorted(VARIANCE_TO_DIFFUSERS)}, got {variance!r}"
        )
    betas = schedule.betas.detach().cpu().double().numpy()
    T = schedule.T
    named = {**SCHEDULER_DEFAULTS, "num_train_timesteps": T}
    fields: dict[str, Any] = {"trained_betas": [float(b) for b in betas]}
    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        candidate = dict(named, beta_schedule=kind, trained_betas=None)
        if kind != "squaredcos_cap_v2":  # the cosine schedule has no end points
            candidate.update(beta_start=float(betas[0]), beta_end=float(betas[-1]))
        if np.allclose(_betas(candidate, T).betas.cpu().numpy(), betas, rtol=0, atol=1e-12):
            keys = ("beta_schedule", "beta_start", "beta_end", "trained_betas")
            fields = {k: candidate[k] for k in keys}
            break
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **named,
        **fields,
        "variance_type": VARIANCE_TO_DIFFUSERS[variance],
        "clip_sample": bool(clip_x0),
    }
