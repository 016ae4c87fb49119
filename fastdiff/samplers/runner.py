"""The shared runner of every sampler: static step buffers, one step, capture and replay.

    z_T ~ N(0, I) (or given latents);  repeat num_steps times:  step(buf)

Every step runs on static device buffers (``StepBuffers``): the latents ``z`` (B, C, H, W),
the step index ``t`` (B,), the noise seed (1,), a step counter ``k`` (1,) and, for multistep
samplers, the history ``x0`` (the previous step's x0 prediction, like z).  One step is

    pred = model(z, t);  method.update(buf, pred)   (fused update of z in place, advancing
                                                     t and the sampler's own counters);
    seed += 1

A class-conditional model (``Guidance``, samplers.guidance) also has the labels y (B,) in the
buffers: the model call is model(z, t, y), or for a guidance scale s != 1 one call on the 2B
rows [z; z], [t; t], [y; null] whose halves go to the fused update as ``pred`` and
``pred_uncond`` (the kernel forms eps_u + s (eps_c - eps_u)).  The guided step is still one
captured graph; the labels are copied into their static buffer before the replays.

and every per-step quantity the update needs is read from device tables indexed by t or k.
Because nothing is decided on the host between steps, the step is captured once as a CUDA
graph and replayed once per step, and it produces exactly the images of the eager loop, which
runs the very same step function (CPU, or ``cuda_graph=False``).

A sampler ("method") is a class in its own module (ddpm.py, ddim.py, dpm_solver.py) built
from (schedule, SamplerSpec) with: ``timesteps`` (the 0-based indices visited, first to last),
``needs_history``, ``unavailable()`` (why its step cannot be captured, or None) and
``update(buf, pred)``.  Adding a sampler is adding such a module to ``METHODS``.

Seeds: ``run_sampler(..., seed=s)`` draws z_T for batch b from a torch.Generator seeded with
(s, b) and the step noise from in-kernel Philox with seeds derived from (s, b); the same seed
gives the same images on the same device and backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .. import cuda_graphs
from ..precision import Precision, memory_format
from ..profiling import phase
from ..progress import progress_bar
from ..schedule import NoiseSchedule
from ..validation import require_int
from . import ddim, ddpm, dpm_solver
from .guidance import Guidance
from .spec import SamplerSpec

#: The sampler classes by SamplerSpec.name.
METHODS = {"ddpm": ddpm.DDPM, "ddim": ddim.DDIM, "dpm++2m": dpm_solver.DPMSolver2M}
#: Spacing of the per-batch seed streams: batch b of seed s uses step seeds
#: s * 2**32 + b * 2**20 + k (k < T <= 2**20).
BATCH_STRIDE, SEED_STRIDE = 2**20, 2**32


class StepBuffers:
    """The static state of one sampling batch, on z's device: latents z, step indices t (B,),
    seed (1,), step counter k (1,), with ``history`` the previous x0 prediction (like z), and
    with ``guidance`` the labels y (B,) (``labels``, else the null class) and, for a batched
    (s != 1) guidance, the 2B labels [y; null] of the doubled model call."""

    def __init__(
        self, z: torch.Tensor, first_step: int, seed: int, history: bool = False,
        guidance: Guidance | None = None, labels: torch.Tensor | None = None,
    ):  # fmt: skip
        self.z = z
        self.t = torch.full((z.shape[0],), first_step, dtype=torch.long, device=z.device)
        self.seed = torch.full((1,), seed, dtype=torch.long, device=z.device)
        self.k = torch.zeros((1,), dtype=torch.long, device=z.device)
        self.x0 = torch.zeros_like(z) if history else None
        self.y = self.y2 = None
        if guidance is not None:
            self.null = guidance.num_classes
            self.y = torch.full_like(self.t, self.null)
            self.y2 = torch.cat([self.y, self.y]) if guidance.batched else None
            self.set_labels(labels)

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Copy a batch's labels (None: the null class) into the static label buffers."""
        if self.y is None:
            return
        if labels is None:
            self.y.fill_(self.null)
        else:
            self.y.copy_(labels)
        if self.y2 is not None:
            self.y2[: self.y.shape[0]].copy_(self.y)

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return tuple(b for b in (self.z, self.t, self.seed, self.k, self.x0) if b is not None)

    def snapshot(self):
        return tuple(b.clone() for b in self._buffers())

    def restore(self, snap) -> None:
        for buf, saved in zip(self._buffers(), snap, strict=True):
            buf.copy_(saved)

    def reset(self, z0: torch.Tensor, first_step: int, seed: int) -> None:
        """Start a new chain from z0 in place (the captured graph keeps the addresses)."""
        self.z.copy_(z0)
        self.t.fill_(first_step)
        self.seed.fill_(seed)
        self.k.zero_()
        if self.x0 is not None:
            self.x0.zero_()


class SamplerRunner:
    """Runs one sampler (a SamplerSpec with clip_x0 and variance resolved) for batches of one
    shape; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        spec: SamplerSpec,
        *,
        precision: Precision,
        channels_last: bool,
        guidance: Guidance | None = None,
    ):
        if spec.clip_x0 is None or spec.variance is None:
            raise ValueError("spec: resolve clip_x0 and variance first (SamplerSpec.for_model)")
        spec.check_T(schedule.T)
        self.model = model
        self.schedule = schedule
        self.spec = spec
        self.method = METHODS[spec.name](schedule, spec)
        self.precision = precision
        self.channels_last = channels_last
        self.guidance = guidance
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, StepBuffers]] = {}
        self.graph_failed = False  # a capture failed: this sampler runs eagerly from now on

    @property
    def kind(self) -> str:
        return self.spec.name

    @property
    def timesteps(self) -> list[int]:
        return self.method.timesteps

    @property
    def num_steps(self) -> int:
        return len(self.method.timesteps)

    @property
    def capturable(self) -> bool:
        return self.method.unavailable() is None

    def buffers(self, z: torch.Tensor, seed: int, labels=None) -> StepBuffers:
        """Fresh step buffers for a chain starting from z (used as the latents buffer), with
        the batch's labels for a conditional model (None: the null class)."""
        return StepBuffers(z, self.timesteps[0], seed, history=self.method.needs_history,
                           guidance=self.guidance, labels=labels)  # fmt: skip

    def graph_unavailable(self, device: torch.device) -> str | None:
        """Why this sampler's step cannot be captured on ``device`` (None: it can)."""
        reason = self.method.unavailable()
        if reason is not None:
            return reason
        if self.graph_failed:
            return "an earlier capture of this sampler's step failed"
        return cuda_graphs.unavailable_reason(device)

    def predict(self, buf: StepBuffers) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, None) of the model at the buffers' z, t (and y); guided: (eps_c, eps_u),
        the halves (views) of one model call on the 2B rows [z; z], [t; t], [y; null]."""
        g = self.guidance
        with self.precision.autocast(buf.z.device, cache=False):
            if g is None:
                return self.model(buf.z, buf.t), None
            if not g.batched:
                return self.model(buf.z, buf.t, buf.y), None
            B = buf.z.shape[0]
            pred = self.model(torch.cat([buf.z, buf.z]), torch.cat([buf.t, buf.t]), buf.y2)
            return pred[:B], pred[B:]

    def step(self, buf: StepBuffers) -> None:
        """One step on the static buffers, advancing t, k and the seed in place."""
        with phase("sampler step"):
            pred, uncond = self.predict(buf)
            if uncond is None:
                self.method.update(buf, pred)
            else:
                self.method.update(buf, pred, uncond, self.guidance.scale)
            buf.seed.add_(1)

    def run_eager(self, buf: StepBuffers, on_step=None) -> torch.Tensor:
        """Run every step on ``buf``; ``on_step()`` is called after each (progress bars)."""
        if self.method.needs_history and buf.x0 is None:
            buf.x0 = torch.zeros_like(buf.z)
        for _ in range(self.num_steps):
            self.step(buf)
            if on_step is not None:
                on_step()
        return buf.z

    def run_graph(
        self, z0: torch.Tensor, seed: int, on_step=None, strict: bool = False, labels=None
    ) -> torch.Tensor:
        """Capture the step once for this batch size (cached), then replay it per step;
        ``on_step()`` is called after each replay is queued (the GPU may still be behind).
        If the capture fails (a model that cannot be captured), the chain runs eagerly from
        z0 after one log line (``cuda_graphs.capture``), or raises when ``strict``.
        ``labels`` (B,): the batch's classes (a conditional model; None: the null class)."""
        B = z0.shape[0]
        with torch.cuda.device(z0.device):  # streams and capture on z0's GPU, not the current
            if B not in self._graphs and not self.graph_failed:
                captured = self._capture(torch.empty_like(z0), strict)
                if captured is None:
                    self.graph_failed = True
                else:
                    self._graphs[B] = captured
            if self.graph_failed:
                return self.run_eager(self.buffers(z0.clone(), seed, labels), on_step)
            graph, buf = self._graphs[B]
            buf.reset(z0, self.timesteps[0], seed)
            buf.set_labels(labels)
            for _ in range(self.num_steps):
                graph.replay()
                if on_step is not None:
                    on_step()
            return buf.z.clone()

    def _capture(self, z: torch.Tensor, strict: bool):
        """(graph, its static buffers) for latents shaped like z, or None if it failed."""
        # A private generator: the default one (training's dropout stream) stays untouched.
        z.normal_(generator=torch.Generator(z.device).manual_seed(0))
        buf = self.buffers(z, 0)
        snap = buf.snapshot()

        def warm_up():  # autotuning and lazy initialisation happen outside the capture
            for _ in range(3):  # each from the first step: t stays in range however few steps
                buf.restore(snap)
                self.step(buf)

        cuda_graphs.run_on(cuda_graphs.side_stream(z.device), warm_up, z.device)
        buf.restore(snap)
        graph = cuda_graphs.capture(
            lambda: self.step(buf), device=z.device, what="sampling: cuda_graph", strict=strict
        )
        return None if graph is None else (graph, buf)


def sampling_timesteps(T: int, sampler: str, steps: int | None) -> list[int]:
    """The 0-based step indices a sampler visits, first to last."""
    return METHODS[sampler].sampling_timesteps(T, steps)


def initial_noise(shape, device, seed: int, batch_index: int, channels_last: bool):
    """z_T for one batch: standard normal from a generator seeded by (seed, batch_index)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)
    z = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return z.contiguous(memory_format=memory_format(channels_last))


def run_sampler(sampler: SamplerRunner, n: int, image_shape: tuple[int, int, int],
                device: torch.device, **options) -> torch.Tensor:  # fmt: skip
    """n images (n, C, H, W) in [-1, 1], float32 on ``device``: :func:`iter_sampler`'s
    batches (same arguments) concatenated."""
    return torch.cat(list(iter_sampler(sampler, n, image_shape, device, **options)))


def iter_sampler(
    sampler: SamplerRunner,
    n: int,
    image_shape: tuple[int, int, int],
    device: torch.device,
    *,
    seed: int,
    batch_size: int,
    cuda_graph: bool,
    progress: bool = False,
    strict: bool = False,
    latents: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """The n images batch by batch: batch b is (min(batch_size, n - b batch_size), C, H, W)
    float32 in [-1, 1] on ``device``, drawn only when asked for (so a caller that reduces each
    batch, e.g. to FID features, never holds n images).  ``labels`` (n,): the class of each
    image (a conditional model; None: the null class).

    Each batch starts from ``initial_noise`` or, given ``latents`` (n, C, H, W) (checked by
    ``check_latents``), from its slice of them.  With ``cuda_graph`` on CUDA the step is
    captured and replayed (``SamplerRunner.run_graph``); where it cannot be, the chain runs
    eagerly after one log line, or raises when ``strict``.
    """
    use_graph = cuda_graph and cuda_graphs.on_cuda(device)
    reason = sampler.graph_unavailable(device) if use_graph else None
    if reason is not None:
        cuda_graphs.fall_back("sampling: cuda_graph", reason, strict)
        use_graph = False
    batches = math.ceil(n / batch_size)
    bar = progress_bar(batches * sampler.num_steps, desc="sampling", unit="step", enabled=progress)
    fmt = memory_format(sampler.channels_last)
    try:
        for b in range(batches):
            size = min(batch_size, n - b * batch_size)
            with torch.inference_mode():
                if latents is None:
                    z0 = initial_noise((size, *image_shape), device, seed, b, sampler.channels_last)
                else:
                    z0 = latents[b * batch_size : b * batch_size + size]
                    z0 = z0.to(torch.float32).contiguous(memory_format=fmt).clone()
                step_seed = seed * SEED_STRIDE + b * BATCH_STRIDE
                y = None if labels is None else labels[b * batch_size : b * batch_size + size]
                y = None if y is None else y.to(device)
                if use_graph:
                    z = sampler.run_graph(z0, step_seed, on_step=bar.update, strict=strict,
                                          labels=y)  # fmt: skip
                else:
                    z = sampler.run_eager(sampler.buffers(z0, step_seed, y), on_step=bar.update)
            # Out of inference mode, so the batch is a normal tensor (a consumer may write it).
            yield z.float().clamp(-1.0, 1.0).contiguous()
    finally:
        bar.close()


def check_run_args(n, batch_size, seed, T) -> int:
    """Validate the run's arguments before any work; returns the batch size to use."""
    require_int("n", n)
    batch_size = require_int("batch_size", min(n, 256) if batch_size is None else batch_size)
    require_int("seed", seed, 0, 2**31 - 1)
    if T > BATCH_STRIDE:
        raise ValueError(f"schedule: at most {BATCH_STRIDE} steps are supported, got T={T}")
    return batch_size


def check_latents(latents, n: int, image_shape, device: torch.device) -> None:
    """latents: a floating tensor (n, C, H, W) on the sampling device, else a TypeError /
    ValueError naming it."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents: expected a torch.Tensor, got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(
            f"latents: expected a floating tensor (float32/16, bfloat16), got {latents.dtype}"
        )
    want = (n, *image_shape)
    if tuple(latents.shape) != want:
        raise ValueError(f"latents: expected shape {want} (n, C, H, W), got {tuple(latents.shape)}")
    if latents.device != device:
        raise ValueError(
            f"latents: expected a tensor on the sampling device {device}, got {latents.device}"
        )
