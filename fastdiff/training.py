"""Training (Algorithm 20.1) through the fused noising and loss kernels.

Each step, for a batch x (B, C, H, W) in [-1, 1]:

    t ~ U{0..T-1} (0-based),  k = the step's noise seed
    z    = q_sample(x, t, schedule, seed=k)        eps drawn in-kernel, never stored
    pred = model(z, t)                               under autocast (bf16 / fp16) if chosen
           (conditional: model(z, t, y'), y' = y or the null class w.p. class_dropout)
    loss = noise_loss(pred, t, seed=k)               eps regenerated from k; backward too
    AdamW step (linear warm-up, gradient clipping), then the EMA update

The loop makes no host-device synchronisation per step: losses stay on the device in a ring
buffer read back only every ``log_every`` steps (which is also where a non-finite loss is
found and reported with its step).  Exact resume: the checkpoint holds model, EMA, optimizer,
grad scaler, step, the t-sampling generator, torch's RNG (dropout) and the data order, and
every per-step quantity (lr, noise seed) is a function of the step number alone.

On CUDA the whole step is captured once as a CUDA graph and replayed (fastdiff.train_graph:
the same step with every per-step value computed on the device); ``cuda_graph=False``,
multi-process runs and other devices run the eager step below.

Preemption (fastdiff.preemption): SIGTERM or SIGINT during the loop finishes the current step,
checkpoints it (skipping that step's sample grid and FID, which could outlast a scheduler's
grace before SIGKILL) and raises TrainingInterrupted; ranks of a multi-process run agree on when to
stop (and on wall-clock checkpoints) with one host-side all-reduce of a few ints per step.
A write that fails (no space, permission denied, read-only file system) raises OutputError
naming the path and the cause; the last good checkpoint stays the one latest.json points to.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import cuda_graphs, distributed, ops, preemption, train_graph
from .data import BATCH_KINDS, make_batches, resolve_data
from .diffusion import Diffusion, build_model
from .ema import DEFAULT_POWER, EMA, check_power
from .errors import CheckpointError, DataError, FastDiffError, OutputError
from .fid_monitor import FIDMonitor
from .images import save_image_grid
from .labels import (
    DEFAULT_CLASS_DROPOUT,
    check_labels,
    class_rows,
    drop_labels,
    model_num_classes,
    resolve_labelled_data,
)
from .metrics_log import MetricsLog
from .precision import (
    memory_format,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
)
from .profiling import phase
from .samplers import SamplerSpec
from .schedule import NoiseSchedule
from .unet import PRESETS, UNet
from .validation import require_int

SAMPLES_FILE = "samples.png"
#: ``lr_schedule`` values: a constant lr after the warm-up, or cosine decay to 0 at ``steps``.
LR_SCHEDULES = ("constant", "cosine")
METRICS_FILE = "metrics.jsonl"

TrainingInterrupted = preemption.TrainingInterrupted
logger = logging.getLogger("fastdiff")
_clock = time.monotonic  # the wall clock of checkpoint_minutes (tests replace it)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


@dataclass
class TrainConfig:
    """The settings of a run (recorded in checkpoints; ``resume`` checks the essential ones)."""

    steps: int
    batch_size: int
    lr: float = 2e-4
    warmup_steps: int = 500
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_power: float = DEFAULT_POWER
    precision: str = "auto"
    channels_last: bool | None = None
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    checkpoint_minutes: float | None = None
    sample_every: int = 0
    n_samples: int = 64
    variance: str = "beta"
    sample_sampler: str = "ddpm"
    sample_steps: int | None = None
    conditional: bool = False
    class_dropout: float = DEFAULT_CLASS_DROPOUT
    fid_every: int = 0
    fid_samples: int = 5000
    extra: dict = field(default_factory=dict)


def _check_config(cfg: TrainConfig) -> None:
    for name, minimum in [
        ("steps", 0),
        ("batch_size", 1),
        ("warmup_steps", 0),
        ("log_every", 1),
        ("checkpoint_every", 0),
        ("sample_every", 0),
        ("n_samples", 1),
        ("fid_every", 0),
        ("fid_samples", 2),
    ]:
        require_int(name, getattr(cfg, name), minimum)
    require_int("seed", cfg.seed, 0, 2**31 - 1)
    check_power(cfg.ema_power)
    for name in ("lr", "grad_clip"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a positive number, got {value!r}")
    minutes = cfg.checkpoint_minutes
    if minutes is not None and not (
        isinstance(minutes, (int, float))
        and not isinstance(minutes, bool)
        and math.isfinite(minutes)
        and minutes >= 0
    ):
        raise ValueError(
            f"checkpoint_minutes: expected None or a number of minutes >= 0, got {minutes!r}"
        )
    if not isinstance(cfg.conditional, bool):
        raise TypeError(f"conditional: expected True or False, got {cfg.conditional!r}")
    p = cfg.class_dropout
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"class_dropout: expected a probability in [0, 1], got {p!r}")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay: expected >= 0, got {cfg.weight_decay}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    grid_spec(cfg)


#: How the grid settings of TrainConfig are named in train()'s errors.
_GRID_NAMES = {"name": "sample_sampler", "steps": "sample_steps"}


def grid_spec(cfg: TrainConfig, T: int | None = None) -> SamplerSpec:
    """The sample grids' SamplerSpec, checked before training (sample() would only fail at
    the end); with T, sample_steps is checked against the schedule too."""
    return SamplerSpec.checked(
        name=cfg.sample_sampler, steps=cfg.sample_steps, variance=cfg.variance, T=T,
        names=_GRID_NAMES,
    )  # fmt: skip


def model_for_data(
    image_shape: tuple[int, int, int], preset: str | None = None, num_classes: int | None = None
) -> UNet:
    """A UNet preset adapted to the data: its channels and size, attention at the same relative
    resolutions, and no more levels than the size allows; class-conditional with
    ``num_classes``.  Default preset: "digits" for 1x16x16 images ("digits_conditional" with
    ``num_classes``), "cifar10" (Ho et al.'s 35.7M model) otherwise."""
    C, H, W = image_shape
    if preset is None and (C, H, W) == (1, 16, 16):
        preset = "digits" if num_classes is None else "digits_conditional"
    elif preset is None:
        preset = "cifar10"
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    cfg = dict(PRESETS[preset])
    mult = list(cfg["channel_mult"])
    while len(mult) > 1 and (H % 2 ** (len(mult) - 1) or W % 2 ** (len(mult) - 1)):
        mult.pop()
    resolutions = [H // 2**i for i in range(len(mult))]
    scale = H / cfg["image_size"]
    attn = sorted(
        {r for r in (round(a * scale) for a in cfg["attention_resolutions"]) if r in resolutions}
    )
    cfg.update(in_channels=C, image_size=H, channel_mult=mult, attention_resolutions=attn)
    return UNet(**cfg, num_classes=num_classes)


def _stored_config(model: UNet) -> dict:
    """``model.config`` as a checkpoint's config.json holds it (tuples become lists)."""
    return json.loads(json.dumps(model.config))


def step_seed(run_seed: int, step: int, rank: int = 0, world: int = 1) -> int:
    """The noise seed of training step ``step`` on ``rank``: a function of (step, rank) alone,
    so resume is exact and no two ranks or steps share noise."""
    return run_seed * 2**32 + step * world + rank


def _schedule(schedule, T: int) -> NoiseSchedule:
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if isinstance(schedule, str):
        return NoiseSchedule.from_name(schedule, T)
    raise ValueError(f"schedule: expected 'linear', 'cosine' or a NoiseSchedule, got {schedule!r}")


def _image_shape(source) -> tuple[int, int, int]:
    if isinstance(source, torch.Tensor):
        return tuple(source.shape[1:])
    item = source[0]
    item = item[0] if isinstance(item, (tuple, list)) else item
    return tuple(torch.as_tensor(item).shape)


def _check_model_fits(model: nn.Module, image_shape) -> None:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and "in_channels" in cfg and cfg["in_channels"] != image_shape[0]:
        raise DataError(
            f"data: images have {image_shape[0]} channel(s) but the model expects"
            f" {cfg['in_channels']} (model in_channels={cfg['in_channels']})"
        )


def _check_model_classes(model: nn.Module, labels: torch.Tensor) -> int:
    """The model's class count, after checking it is conditional and covers the labels."""
    num_classes = model_num_classes(model)
    if num_classes is None:
        raise ValueError(
            "model: a conditional run needs a class-conditional model, forward(z, t, y) with"
            " num_classes (e.g. UNet(..., num_classes=K)); this one has none"
        )
    check_labels(labels, labels.shape[0], num_classes, name="data")
    return num_classes


def train(
    data="digits",
    model: nn.Module | None = None,
    *,
    schedule="linear",
    steps: int,
    batch_size: int,
    T: int = 1000,
    lr: float = 2e-4,
    warmup_steps: int = 500,
    lr_schedule: str = "constant",
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    ema_decay: float = 0.9999,
    ema_power: float = DEFAULT_POWER,
    precision: str = "auto",
    channels_last=None,
    preset: str | None = None,
    device=None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    log_every: int = 50,
    checkpoint_every: int = 1000,
    checkpoint_minutes: float | None = None,
    sample_every: int = 0,
    n_samples: int = 64,
    variance: str = "beta",
    sample_sampler: str = "ddpm",
    sample_steps: int | None = None,
    fid_every: int = 0,
    fid_samples: int = 5000,
    num_workers: int = 0,
    image_size: int | None = None,
    progress: bool = True,
    on_log=None,
    cuda_graph: bool = True,
    compile: bool = False,
    strict: bool | None = None,
    conditional: bool = False,
    class_dropout: float = DEFAULT_CLASS_DROPOUT,
    labels=None,
) -> Diffusion:
    """Train a DDPM noise predictor with Algorithm 20.1 and return the trained Diffusion.

    Args:
        data: a tensor / numpy array (N, C, H, W) in [-1, 1] (or uint8 0..255), a path to an
            .npz or a folder of images, a torch Dataset, or a built-in name ("digits").
        model: any nn.Module with forward(z, t) -> eps (default: a UNet preset fitting data);
            for a conditional run forward(z, t, y) with an int ``num_classes`` (fastdiff.labels).
        schedule: "linear", "cosine" (with T steps) or a NoiseSchedule.
        steps: total optimizer steps (with resume: the step count to reach).
        batch_size: images per step.
        lr, warmup_steps, weight_decay, grad_clip: AdamW with linear warm-up and clipping of
            the global gradient norm.
        lr_schedule: after the warm-up, ``"constant"`` or ``"cosine"`` (decays to 0 at
            ``steps``: lr * 0.5 (1 + cos(pi (k - warmup) / (steps - warmup))); resuming to a
            larger ``steps`` stretches what is left of the decay).
        ema_decay: decay of the weights' moving average (with warm-up, see fastdiff.ema).
        ema_power: the warm-up's profile, decay_k = min(ema_decay, (1 + k) / (k + ema_power
            + 2)): the average at step k weights step j by about (j / k)^ema_power
            (fastdiff.ema); 8 is diffusers' (1 + k) / (10 + k), smaller averages longer.
        precision: "auto", "fp32", "bf16" or "fp16" (with a GradScaler); see
            fastdiff.precision for what auto picks.
        channels_last: True / False / None (auto: on for CUDA, off on CPU).
        preset: UNet preset name when model is None ("digits", "cifar10", "tiny").
        device: "cpu", "cuda", ... (default: CUDA when available).
        out_dir: where metrics.jsonl, checkpoints/ and sample grids go (None: nothing written).
        resume: continue from the latest checkpoint in out_dir (exactly: N steps then resume to
            N + M equals N + M uninterrupted steps on the same device).  With no checkpoint
            there yet, start from step 0 with a one-line notice (logger "fastdiff"), so a job
            script may always pass it.
        seed: seeds model init, data order, t and the noise.
        log_every: steps between loss read-backs (progress bar, metrics log, NaN check).
        checkpoint_every: steps between checkpoints (0: only at the end).
        checkpoint_minutes: also checkpoint when this many minutes of wall-clock time have
            passed since the last checkpoint (None or 0: off), so a run killed without warning
            loses at most that much work.
        sample_every: steps between sample grids (0: only the final samples.png).
        n_samples: images in each grid.
        variance, sample_sampler, sample_steps: how the grids are sampled: ``"ddpm"``
            (Algorithm 20.2, all T steps, with ``variance``), ``"ddim"`` with
            ``sample_steps`` steps (default 50; x0 clamped, eps re-derived) or ``"dpm++2m"``
            (default 20 steps); see sample().
            They make one SamplerSpec (``grid_spec``).
        fid_every: steps between FID/KID measurements of the EMA model (0: none), each with
            ``fid_samples`` images against the first ``fid_samples`` training images; logged
            to metrics.jsonl, shown on the progress bar, the best FID's step kept in the
            checkpoints' config (fastdiff.fid_monitor).  The feature network must be at hand
            (fastdiff.inception) or training does not start.
        num_workers: DataLoader workers when the data streams from host memory.
        image_size: size to resize folder images to.
        on_log: optional callable receiving each metrics record (a dict).
        cuda_graph: on CUDA, capture the whole training step as one CUDA graph after 3 eager
            steps and replay it (fastdiff.train_graph); False runs the eager step.  Where the
            step cannot be captured (multi-process runs, the torch reference backend, a model
            that reads tensors on the host or uses an op graphs do not support) training goes
            on with the eager step from the same state, after one log line saying why; the
            sample grids likewise.  Ignored on other devices.
        conditional: train a class-conditional model for classifier-free guidance on the
            data's labels (fastdiff.labels: the built-in digits', an .npz's ``labels``, a
            folder's class subfolders, a Dataset's (image, label) items, or ``labels``); the
            default model is the preset with ``num_classes`` = the data's class count.
        class_dropout: with ``conditional``, the probability that a label is replaced by the
            null class (the unconditional model), drawn on the device inside the step.
        labels: the class of each image (N,) for tensor / array data with ``conditional``.
        strict: turn those fallbacks into a ``GraphCaptureError`` (None: the
            ``FASTDIFF_STRICT`` environment variable, off by default); for measurements that
            must not time an eager fallback.
        compile: run the model through torch.compile (Inductor's default mode; inside the
            captured step on CUDA).

    Raises:
        TrainingInterrupted: SIGTERM or SIGINT arrived (main thread only); the step in
            progress was finished and checkpointed (see fastdiff.preemption).  A
            KeyboardInterrupt subclass with ``checkpoint``, ``step``, ``signum`` and
            ``exit_status`` (143 for SIGTERM, 130 for SIGINT).
        OutputError: an OSError writing the outputs (no space, permission denied, read-only
            file system); the message names the path and the cause, and the last good
            checkpoint is intact.
    """
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        lr_schedule=lr_schedule,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        ema_power=ema_power,
        precision=precision,
        channels_last=channels_last,
        seed=seed,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        checkpoint_minutes=checkpoint_minutes,
        sample_every=sample_every,
        n_samples=n_samples,
        variance=variance,
        sample_sampler=sample_sampler,
        sample_steps=sample_steps,
        conditional=conditional,
        class_dropout=class_dropout,
        fid_every=fid_every,
        fid_samples=fid_samples,
    )
    _check_config(cfg)
    if labels is not None and not conditional:
        raise ValueError("labels: only used by a conditional run; pass conditional=True")
    strict = cuda_graphs.strict_mode(strict)
    if resume and out_dir is None:
        raise ValueError("resume: needs out_dir, the directory holding the run's checkpoints")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise FastDiffError(f"out_dir: {str(out_dir)!r} exists and is not a directory")
    dist_info, dev = distributed.setup(resolve_device(device))
    try:
        prec = resolve_precision(precision, dev)
        cl = resolve_channels_last(channels_last, dev, prec)
        sched = _schedule(schedule, T).to(dev)
        grid_spec(cfg, sched.T)
        num_classes = class_labels = None
        if conditional:
            source, class_labels, num_classes = resolve_labelled_data(
                data, labels, image_size=image_size
            )
        elif isinstance(data, torch.utils.data.Dataset):
            source = data
        else:
            source = resolve_data(data, image_size=image_size)
        image_shape = _image_shape(source)

        torch.manual_seed(seed)
        if model is None:
            model = model_for_data(image_shape, preset, num_classes)
        _check_model_fits(model, image_shape)
        if conditional:
            num_classes = _check_model_classes(model, class_labels)
        model.to(dev, memory_format=memory_format(cl)).train()

        fid = setup_error = None
        try:  # rank 0 alone: the other ranks must hear of a failure before DDP is built
            if fid_every and dist_info.is_main:
                fid = FIDMonitor(source, fid_samples, dev)
        except Exception as exc:  # noqa: BLE001 - raised again, on every rank, just below
            setup_error = exc
        distributed.raise_together(setup_error, dist_info)
        run = _Run(model, sched, source, image_shape, cfg, dev, prec, cl, num_workers, dist_info,
                   cuda_graph=cuda_graph, compile=compile, strict=strict,
                   labels=class_labels, num_classes=num_classes)  # fmt: skip
        run.fid = fid
        run.data_name = _data_name(data)
        out = Path(out_dir) if out_dir is not None else None
        if resume:
            run.restore(out)
        return run.loop(out, progress=progress and dist_info.is_main, on_log=on_log, resumed=resume)
    except BaseException:
        distributed.teardown()  # the process is about to end: see its docstring
        raise


class _Run:
    """The mutable state of one training run (kept together so it can be checkpointed)."""

    def __init__(self, model, schedule, source, image_shape, cfg, device, prec, cl, workers,
                 dist_info: distributed.DistInfo | None = None, *, cuda_graph: bool = True,
                 compile: bool = False, strict: bool = False, labels=None,
                 num_classes: int | None = None):  # fmt: skip
        self.model, self.schedule, self.cfg = model, schedule, cfg
        self.num_classes = num_classes if cfg.conditional else None
        self.strict = strict
        self.grid_spec = grid_spec(cfg, schedule.T)
        self.device, self.prec, self.channels_last = device, prec, cl
        self.image_shape = image_shape
        self.dist = dist_info or distributed.DistInfo()
        self.net = distributed.wrap(model, self.dist, device)  # what forward/backward run through
        rank_seed = cfg.seed + 1_000_003 * self.dist.rank
        if self.dist.world > 1:
            # Every rank seeded the default generators alike for the model's init (identical
            # replicas); from here they serve dropout, whose masks must differ between ranks
            # as the data, t and noise do.  (Per rank in the checkpoint: exact resume holds.)
            torch.manual_seed(rank_seed + 3)
        self._batch_args = dict(
            data=source, batch_size=cfg.batch_size, device=device, seed=rank_seed,
            num_workers=workers, labels=labels,
        )  # fmt: skip
        self.batches = make_batches(**self._batch_args)
        if compile:
            self.net = torch.compile(self.net)
        graph = train_graph.graph_enabled(cuda_graph, device, self.dist, strict)
        fused = device.type == "cuda" or graph  # the captured step needs fused + capturable
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None,
            capturable=graph,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler(device.type, enabled=prec.grad_scaling)
        self.ema = EMA(model, cfg.ema_decay, cfg.ema_power)
        # Seeds by checkpoint key; a resume on another device type reseeds from them.
        self._generator_seeds = {"t_generator": rank_seed + 1, "label_generator": rank_seed + 2}
        seeds = self._generator_seeds
        self.t_gen = torch.Generator(device=device).manual_seed(seeds["t_generator"])
        # The class-dropout draws (conditional runs): a generator of their own, registered
        # with the captured step like t_gen, and checkpointed for exact resume.
        self.label_gen = torch.Generator(device=device).manual_seed(seeds["label_generator"])
        self.step = 0
        self.seed_buf = torch.zeros(1, dtype=torch.long, device=device)
        self.losses = torch.zeros(cfg.log_every, dtype=torch.float32, device=device)
        self.graph_step = train_graph.GraphStep(self, strict) if graph else None

    # -- one step ---------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """The lr of step ``step``: ``train_graph.lr_schedule`` evaluated on the host, so the
        eager and the CUDA-graph step follow one formula."""
        cfg = self.cfg
        k = torch.tensor(step, dtype=torch.int64)
        return float(
            train_graph.lr_schedule(k, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps)
        )

    def loss_backward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
        autocast_cache: bool = True,
    ):  # fmt: skip
        """Algorithm 20.1's loss for clean images x (N, C, H, W) at steps t (N,), with the
        noise of ``seed_buf``: z_t = q_sample(x, t), loss = noise_loss(model(z_t, t)); runs the
        (scaled) backward and returns the loss (a 0-d tensor).  A conditional run passes the
        labels y (N,): each becomes the null class with probability ``class_dropout``
        (``label_gen``, on the device) and the model sees model(z_t, t, y').  Shared by the
        eager step and the captured one (train_graph, which turns off autocast's weight
        cache)."""
        with phase("noising"):
            z = ops.q_sample(x, t, self.schedule, seed=self.seed_buf, validate=False)
            if self.num_classes is not None:
                y = drop_labels(y, self.cfg.class_dropout, self.num_classes, self.label_gen)
        with phase("forward"), self.prec.autocast(self.device, cache=autocast_cache):
            pred = self.net(z, t) if self.num_classes is None else self.net(z, t, y)
        with phase("loss"):
            loss = ops.noise_loss(pred, t, seed=self.seed_buf, validate=False)
        with phase("backward"):
            self.scaler.scale(loss).backward()
        return loss

    def forget_partial_step(self) -> None:
        """Drop what a step that did not finish left on the host side (a failed capture): the
        gradients (allocated in the dead graph's pool) and the GradScaler's per-step record of
        which optimizers it has unscaled."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # what scaler.update() resets after a step
            self.scaler._per_optimizer_states.clear()

    def clipped_update(self) -> None:
        """Unscale the gradients, clip their global norm to ``grad_clip``, take the optimizer
        step (skipped by the GradScaler on inf/NaN) and update the scale."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def train_step(self) -> None:
        if self.graph_step is not None:  # the same step, device-resident and replayed
            self.graph_step.step()
            self.step += 1
            return
        cfg, k = self.cfg, self.step
        with phase("data"):
            x, y = self.batches.next_labelled()
            x = x.contiguous(memory_format=memory_format(self.channels_last))
            t = torch.randint(
                0, self.schedule.T, (x.shape[0],), device=self.device, generator=self.t_gen
            )
            self.seed_buf.fill_(step_seed(cfg.seed, k, self.dist.rank, self.dist.world))
        loss = self.loss_backward(x, t, y)
        with phase("optimizer"):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(k)
            self.clipped_update()
            self.optimizer.zero_grad(set_to_none=True)
        with phase("EMA"):
            self.ema.update(k)
        self.losses[k % cfg.log_every] = loss.detach()
        self.step = k + 1

    # -- the loop ---------------------------------------------------------------------------

    #: The checkpoint restore() loaded (None: a fresh run).
    restored_from: Path | None = None
    #: FID during training (fastdiff.fid_monitor), on the main rank when fid_every > 0.
    fid: FIDMonitor | None = None
    #: The data argument when it names files or a built-in set (recorded for ``fastdiff eval``).
    data_name: str | None = None

    def loop(self, out: Path | None, *, progress: bool, on_log, resumed: bool = False) -> Diffusion:
        """Train up to ``cfg.steps``: log, checkpoint (every ``checkpoint_every`` steps, every
        ``checkpoint_minutes``, at the end) and stop cleanly on SIGTERM / SIGINT.

        Checkpoints are written between steps, never inside one.  Every rank takes the same
        decisions at the same step: after each step one host-side all-reduce (gloo, CPU
        tensors: no device synchronisation) agrees on [signal received, rank 0's clock says
        checkpoint, rank 0's output write failed].  A signal makes every rank log and save the
        finished step, then raise TrainingInterrupted; a failed write raises rank 0's
        OutputError on every rank.  ``resumed``: drop metrics records past the current step.
        """
        cfg = self.cfg
        writes = out is not None and self.dist.is_main
        self._failure: OutputError | None = None
        metrics = None
        if writes:
            try:
                _make_out_dir(out)
                metrics = MetricsLog(
                    out / METRICS_FILE, resumed_step=self.step if resumed else None
                )
            except OutputError as exc:
                self._output_failed(exc)
        self._agree_on_failure()
        saved_step, saved_path = self.step, self.restored_from
        last_save = _clock()
        bar = _bar(cfg.steps, self.step, progress)
        window = (time.perf_counter(), self.step)
        try:
            with preemption.StopSignals() as signals:
                while self.step < cfg.steps:
                    self.train_step()
                    done = self.step == cfg.steps
                    logged = self.step % cfg.log_every == 0 or done
                    if logged:
                        window = self._log(window, bar, metrics, on_log)
                    time_due = (
                        self.dist.is_main
                        and bool(cfg.checkpoint_minutes)
                        and _clock() - last_save >= 60 * cfg.checkpoint_minutes
                    )
                    signum, time_due, failed = distributed.max_across_ranks(
                        [signals.received or 0, time_due, self._failure is not None], self.dist
                    )
                    if failed:
                        self._agree_on_failure(failed)
                    # A stopping run saves at once: a scheduler's grace before SIGKILL (30 s
                    # for torchrun and Slurm) may be shorter than a grid or an FID.
                    grid_due = bool(cfg.sample_every) and self.step % cfg.sample_every == 0
                    fid_due = bool(cfg.fid_every) and self.step % cfg.fid_every == 0
                    if (grid_due or fid_due) and not signum:
                        if writes and grid_due:
                            path = out / "samples" / f"step_{self.step:08d}.png"
                            self._write(self._save_grid, path, what="sample grid")
                        if self.fid is not None and fid_due:
                            self._measure_fid(bar, metrics, on_log)
                        # The other ranks wait for rank 0's grid / FID here, on the host group,
                        # not in the next step's NCCL all-reduce (its watchdog aborts after 10
                        # minutes), and learn whether its writes failed before any save.
                        self._agree_on_failure()
                    if signum and not logged:  # the metrics log ends at the saved step
                        window = self._log(window, bar, metrics, on_log)
                    periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    if (
                        out is not None
                        and self.step != saved_step
                        and (done or signum or time_due or periodic)
                    ):
                        saved_path = self.save(out)  # a collective: every rank's state to rank 0
                        saved_step, last_save = self.step, _clock()
                    if signum:
                        raise TrainingInterrupted(signum, self.step, saved_path, out)
                # A signal during the last step or the final save: agreed here, acted on now.
                signum, failed = distributed.max_across_ranks(
                    [signals.received or 0, self._failure is not None], self.dist
                )
                if failed:
                    self._agree_on_failure(failed)
                if signum:
                    raise TrainingInterrupted(signum, self.step, saved_path, out)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            # Under a CUDA graph the grads live in the graph's private pool: let it go.
            self.optimizer.zero_grad(set_to_none=True)
            if self.graph_step is not None:
                self.graph_step.release()
        diffusion = self.diffusion()
        if writes and cfg.steps > 0:
            self._write(self._save_grid, out / SAMPLES_FILE, diffusion, what="sample grid")
        self._agree_on_failure()  # also the final barrier: rank 0 has written everything
        return diffusion

    def _log(self, window: tuple[float, int], bar, metrics: MetricsLog | None, on_log):
        """Log the steps since ``window`` = (start time, start step); return the next window."""
        record = self._log_window(window[1], time.perf_counter() - window[0])
        bar.update(self.step - bar.n)
        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}",
                        **self._fid_postfix())  # fmt: skip
        if metrics is not None:
            self._write(metrics.append, record)
        if on_log is not None and self.dist.is_main:
            on_log(record)
        return time.perf_counter(), self.step

    def _fid_postfix(self) -> dict:
        last = None if self.fid is None else self.fid.last
        return {} if last is None else {"fid": f"{last:.2f}"}

    def _measure_fid(self, bar, metrics: MetricsLog | None, on_log) -> None:
        """One FID/KID record of the EMA model (see fastdiff.fid_monitor), logged like the
        loss records; sampling leaves the training RNG and the model's mode as they were."""
        rng_state = torch.get_rng_state()
        record = self.fid.measure(self.diffusion(), self.step, seed=self.cfg.seed,
                                  channels_last=self.channels_last, strict=self.strict)  # fmt: skip
        torch.set_rng_state(rng_state)
        self.model.train()
        bar.set_postfix(**self._fid_postfix())
        if metrics is not None:
            self._write(metrics.append, record)
        if on_log is not None:
            on_log(record)

    def _write(self, write, *args, what: str | None = None) -> None:
        """Run a rank-0 output write; report its failure as an OutputError (see loop)."""
        try:
            write(*args)
        except OutputError as exc:
            self._output_failed(exc)
        except OSError as exc:
            self._output_failed(OutputError.wrap(what, args[0], exc))

    def _output_failed(self, exc: OutputError) -> None:
        """Alone: raise at once.  Distributed: remember it; every rank raises it at the next
        agreement (rank 0 leaving on its own would leave the others waiting in a collective)."""
        if not self.dist.enabled:
            raise exc
        self._failure = self._failure or exc

    def _agree_on_failure(self, failed: bool | None = None) -> None:
        """Raise rank 0's output error on every rank if it had one (a collective)."""
        if failed is None:
            failed = distributed.max_across_ranks([self._failure is not None], self.dist)[0]
        if not failed:
            return
        error = self._failure
        summary = None if error is None else (error.errno, str(error), error.filename)
        summary = distributed.broadcast_from_main(summary, self.dist)
        raise error if error is not None else OutputError(*summary)

    def _log_window(self, window_step: int, seconds: float) -> dict:
        """Read the window's losses back (the only sync), refusing non-finite ones."""
        n = self.step - window_step
        first = window_step % self.cfg.log_every
        losses = distributed.mean_across_ranks(self.losses, self.dist).tolist()
        window = [losses[(first + i) % self.cfg.log_every] for i in range(n)]
        for i, value in enumerate(window):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at step {window_step + i + 1}; training stopped (the last"
                    " checkpoint, if any, is intact). Lower lr or use precision='fp32'."
                )
        return {
            "step": self.step,
            "loss": sum(window) / max(n, 1),
            "lr": self.lr_at(self.step - 1),
            "images_per_s": n * self.cfg.batch_size * self.dist.world / max(seconds, 1e-9),
            "time": time.time(),
        }

    # -- outputs ----------------------------------------------------------------------------

    def diffusion(self) -> Diffusion:
        """The run's model, EMA weights and schedule as a Diffusion (shares the tensors)."""
        if self.graph_step is not None:
            self.graph_step.publish()  # replayed updates become visible to weight caches
        config = {
            "train": {k: v for k, v in asdict(self.cfg).items() if k != "extra"},
            "precision": self.prec.name,
            "channels_last": self.channels_last,
            "step": self.step,
        }
        if self.num_classes is not None:
            config["num_classes"] = self.num_classes
        if self.data_name is not None:
            config["data"] = self.data_name
        if self.fid is not None and self.fid.best is not None:
            config["fid_best"] = self.fid.best
        return Diffusion(
            self.model, self.schedule, self.image_shape, ema_model=self.ema.shadow, config=config
        )

    def _save_grid(self, path: Path, diffusion: Diffusion | None = None) -> None:
        diffusion = diffusion or self.diffusion()
        rng_state = torch.get_rng_state()  # sampling must not disturb the training RNG
        n, labels, nrow = self.cfg.n_samples, None, None
        if self.num_classes is not None:  # one row per class, the default guidance scale
            nrow = max(1, n // self.num_classes)
            labels = class_rows(self.num_classes, nrow)
            n = labels.numel()
        images = diffusion.sample(
            n,
            labels=labels,
            seed=self.cfg.seed,
            # The training layout: sample() converts a module it samples to another layout in
            # place (precision.to_channels_last), and the captured training step holds the
            # weights' addresses.
            channels_last=self.channels_last,
            sampler=self.grid_spec,
            strict=self.strict,
        )
        torch.set_rng_state(rng_state)
        self.model.train()
        save_image_grid(images, path, nrow, scale=max(1, 64 // max(self.image_shape[1:])))

    def rank_state(self) -> dict:
        """What differs between ranks: RNG streams and data order."""
        state = {
            "t_generator": self.t_gen.get_state(),
            "label_generator": self.label_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "batches": self.batches.state_dict(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, out: Path) -> Path:
        """Checkpoint the current step; return its directory.  A collective: every rank calls
        it (the rank states are gathered), rank 0 writes, and every rank returns the path or
        raises rank 0's OutputError (the previous checkpoint stays the latest)."""
        ranks = distributed.gather_to_main(self.rank_state(), self.dist)
        result = None
        if self.dist.is_main:
            train_state = {
                "step": self.step,
                "world_size": self.dist.world,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ranks": ranks,
            }
            try:
                result = ckpt.save_run_checkpoint(
                    out,
                    self.step,
                    model_state=self.model.state_dict(),
                    ema_state=self.ema.shadow.state_dict(),
                    config=self.diffusion().checkpoint_config(),
                    train_state=train_state,
                )
            except OutputError as exc:
                result = exc
        result = distributed.broadcast_from_main(result, self.dist)
        if isinstance(result, OutputError):
            raise result
        return result

    def restore(self, out: Path) -> Path | None:
        """Load the newest intact checkpoint of the run in ``out`` (exact resume) and return it:
        damaged newer ones are skipped with one log line naming them and why
        (ckpt.find_intact_checkpoint; none intact: its CheckpointError).  With no checkpoint
        there at all, log a one-line notice and keep the fresh state (None)."""
        try:
            directory, skipped = ckpt.find_intact_checkpoint(out)
        except ckpt.NoCheckpointError:
            if self.dist.is_main:
                logger.warning(f"fastdiff: no checkpoint in {str(out)!r} yet; starting at step 0")
            return None
        if self.dist.is_main:
            ckpt.log_skipped("resuming from", directory, skipped)
        config = ckpt.read_config(directory)
        self._check_compatible(config, directory)
        if self.fid is not None:
            self.fid.best = config.get("fid_best")
        build_model(config, self.model, str(directory))
        try:
            self.model.load_state_dict(ckpt.load_weights(directory, ckpt.MODEL, self.device))
            self.ema.shadow.load_state_dict(ckpt.load_weights(directory, ckpt.EMA, self.device))
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint: {str(directory)!r} does not match this model: "
                f"{str(exc).strip().splitlines()[0]}"
            ) from exc
        state = ckpt.load_train_state(directory)
        if state.get("world_size") != self.dist.world:
            raise CheckpointError(
                f"checkpoint: {str(directory)!r} was written by {state.get('world_size')}"
                f" process(es), this run has {self.dist.world}; exact resume needs the same"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][self.dist.rank]
        step = int(state["step"])
        self._restore_generator(self.t_gen, mine["t_generator"], "t_generator", step)
        if "label_generator" in mine:
            self._restore_generator(
                self.label_gen, mine["label_generator"], "label_generator", step
            )
        torch.set_rng_state(mine["torch_rng"])
        if "cuda_rng" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self._batches_of_kind(mine["batches"].get("kind"))
        self.batches.load_state_dict(mine["batches"])
        self.step = int(state["step"])
        self.restored_from = directory
        return directory

    def _restore_generator(
        self, gen: torch.Generator, state: torch.Tensor, name: str, step: int
    ) -> None:
        """Set ``gen`` to a checkpoint's state, or, when that state was written by a generator
        of another device type (a CPU run resumed on CUDA or back: a CPU generator's state is
        5056 bytes, a CUDA one's 16, and ``set_state`` refuses the other's), reseed it from
        the run's seed and the step, so that the resumed run is still deterministic.  Only
        that stream then differs from an uninterrupted run; a resume on another device is not
        bit-exact anyway."""
        if state.numel() == gen.get_state().numel():
            gen.set_state(state)
            return
        gen.manual_seed(self._generator_seeds[name] + (step << 32))
        if self.dist.is_main:
            logger.warning(
                f"fastdiff: the checkpoint's {name} state comes from another device type than "
                f"{self.device.type!r}; reseeded at step {step} (resume is exact only on the "
                "device type the run started on)"
            )

    def _batches_of_kind(self, kind) -> None:
        """Take the batch source kind a checkpoint was saved by: in-memory or streamed was
        chosen from the device's free memory when that run started, which a resume may not
        see again (the captured step gathers from the new source)."""
        if kind == self.batches.kind or kind not in BATCH_KINDS:
            return  # an unknown kind: load_state_dict names it
        if isinstance(self._batch_args["data"], torch.utils.data.Dataset):
            return  # only ever streamed
        self.batches = make_batches(**self._batch_args, kind=kind)
        if self.graph_step is not None:
            self.graph_step = train_graph.GraphStep(self, self.strict)

    def _check_compatible(self, config: dict, directory: Path) -> None:
        saved = config.get("train", {})
        mine = asdict(self.cfg)
        keys = ["batch_size", "seed", "precision", "conditional", "ema_power"]
        if saved.get("conditional"):  # an unconditional run never draws label dropout
            keys.append("class_dropout")
        for key in keys:
            if key in saved and saved[key] != mine[key]:
                raise CheckpointError(
                    f"checkpoint: {str(directory)!r} was trained with {key}={saved[key]!r},"
                    f" this run has {key}={mine[key]!r}; resume needs the same value"
                )
        if config.get("schedule", {}).get("betas") != self.schedule.config()["betas"]:
            raise CheckpointError(f"checkpoint: {str(directory)!r} used another noise schedule")
        if list(config.get("image_shape", [])) != list(self.image_shape):
            raise CheckpointError(
                f"checkpoint: {str(directory)!r} was trained on images of shape"
                f" {config.get('image_shape')}, the data has {list(self.image_shape)}"
            )
        self._check_same_unet(config.get("model", {}).get("config"), directory)

    def _check_same_unet(self, saved: dict | None, directory: Path) -> None:
        """A UNet checkpoint resumes only into the same architecture: name what differs and,
        where the checkpoint's model is a preset, the preset that rebuilds it (a run started
        before the default preset changed, e.g. a conditional digits run before
        "digits_conditional", needs its own)."""
        if saved is None or not isinstance(self.model, UNet):
            return
        mine = _stored_config(self.model)
        if saved == mine:
            return
        diff = ", ".join(
            f"{k}={saved.get(k)!r} (this run: {mine.get(k)!r})"
            for k in sorted(set(saved) | set(mine))
            if saved.get(k) != mine.get(k)
        )
        with torch.device("meta"):  # configs only, no weights
            models = {
                n: model_for_data(self.image_shape, n, saved.get("num_classes")) for n in PRESETS
            }
        names = [name for name, model in models.items() if _stored_config(model) == saved]
        hint = f"; pass preset={names[0]!r} (--preset {names[0]}) to resume it" if names else ""
        raise CheckpointError(f"checkpoint: {str(directory)!r} holds a UNet with {diff}{hint}")


def _data_name(data) -> str | None:
    """A data argument that names its images (absolute path, or a built-in name), else None."""
    if not isinstance(data, (str, Path)):
        return None
    path = Path(data)
    return str(path.resolve()) if path.exists() else str(data)


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.wrap("output directory", out, exc, verb="create") from exc


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="training",
        unit="step",
        dynamic_ncols=True,
    )
