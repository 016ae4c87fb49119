"""Sampling (Algorithm 20.2) through the fused reverse step, CUDA-graph captured on GPUs.

    z_T ~ N(0, I);  for i = T-1 .. 0:  z <- reverse_step(z, g(z, i), i)      (i = t - 1)

(or, with ``sampler="ddim"``, a few evenly spaced steps with the DDIM update).

Every step runs on three static device buffers: the latents ``z`` (B, C, H, W), the step
index ``t`` (B,) and the noise seed (1,).  One step is: pred = model(z, t); z <- mu + sigma eps
(in place); t <- prev_step[t] (t - 1 for ddpm); seed += 1.  Because t and the seed live in
device memory and are advanced by the step itself, that step is captured once as a CUDA graph
and replayed once per step with no host work in between, and it produces exactly the same
images as the eager loop, which runs the very same step function (CPU, or
``cuda_graph=False``).

Classifier-free guidance (a class-conditional model, ``Guidance``): the static buffers also
hold the labels y (B,).  With scale s != 1 the step makes one model call on 2B rows,
model([z; z], [t; t], [y; null]) -> [eps_c; eps_u], and hands the two halves (views) to the
fused step, which forms eps = eps_u + s (eps_c - eps_u) in the kernel; s == 1 calls the model
on the B conditional rows only.  The whole guided step is the one captured graph.

Seeds: ``sample(..., seed=s)`` draws z_T for batch b from a torch.Generator seeded with
(s, b) and the step noise from in-kernel Philox with seeds derived from (s, b); the same seed
gives the same images on the same device and backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import cuda_graphs, ops
from .labels import check_labels
from .precision import Precision, memory_format
from .profiling import phase
from .progress import progress_bar
from .schedule import NoiseSchedule
from .validation import require_int

SAMPLERS = ("ddpm", "ddim")
#: sample()'s guidance scale for a class-conditional model when none is given: chosen from
#: the class-accuracy / judge-FD table in docs/PERFORMANCE.md ("Classifier-free guidance").
DEFAULT_GUIDANCE_SCALE = 3.0
#: Spacing of the per-batch seed streams: batch b of seed s uses step seeds
#: s * 2**32 + b * 2**20 + k (k < T <= 2**20).
_BATCH_STRIDE, _SEED_STRIDE = 2**20, 2**32


@dataclass(frozen=True)
class Guidance:
    """How a class-conditional model is sampled: its ``num_classes`` K (labels 0..K-1; K is
    the null class) and the classifier-free guidance ``scale`` s of
    eps = eps_u + s (eps_c - eps_u) (diffusers' convention: 1 is the conditional model
    alone, 0 the unconditional one)."""

    num_classes: int
    scale: float = 1.0

    @property
    def batched(self) -> bool:
        """Whether a step needs the unconditional prediction too (one model call on 2B)."""
        return self.scale != 1.0


class StepBuffers:
    """The static state of one sampling batch: latents, step indices and seed, on device;
    for a conditional model also the labels y (B,) and the doubled batch's [y; null] (2B,)."""

    def __init__(
        self, z: torch.Tensor, first_step: int, seed: int, labels: torch.Tensor | None = None,
        guidance: Guidance | None = None,
    ):  # fmt: skip
        self.z = z
        self.t = torch.full((z.shape[0],), first_step, dtype=torch.long, device=z.device)
        self.seed = torch.full((1,), seed, dtype=torch.long, device=z.device)
        self.y = self.y2 = None
        if guidance is not None:
            null = torch.full_like(self.t, guidance.num_classes)
            self.y = null.clone() if labels is None else labels.to(z.device, torch.long).clone()
            if guidance.batched:
                self.y2 = torch.cat([self.y, null])

    def set_labels(self, labels: torch.Tensor | None, guidance: Guidance | None) -> None:
        """Copy a batch's labels into the static buffers (before replaying a graph)."""
        if self.y is None:
            return
        if labels is None:
            self.y.fill_(guidance.num_classes)
        else:
            self.y.copy_(labels)
        if self.y2 is not None:
            self.y2[: self.y.shape[0]].copy_(self.y)

    def snapshot(self):
        return self.z.clone(), self.t.clone(), self.seed.clone()

    def restore(self, snap) -> None:
        for buf, saved in zip((self.z, self.t, self.seed), snap, strict=True):
            buf.copy_(saved)


class Sampler:
    """Runs the reverse chain for batches of one shape; see the module docstring.

    ``sampler="ddpm"`` visits every step T-1 .. 0 with the fused reverse step;
    ``sampler="ddim"`` visits ``steps`` evenly spaced steps (T-1 .. 0) with the DDIM update.
    Either way the next step index comes from a device table, ``prev_step[t]`` (-1 after the
    last step), so one captured step serves every replay.

    ``clip_x0`` clamps the predicted x0 to [-1, 1] at every step: for ddpm the step then uses
    the posterior mean at the clamped x0 (improved-diffusion's ``clip_denoised``); for ddim,
    ``clip_rule`` says whether eps is re-derived from the clamped x0 (``"rederive"``) or kept
    (``"diffusers"``); see ``ops.ddim_step``.
    """

    def __init__(
        self,
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
        guidance: Guidance | None = None,
    ):
        if variance not in ops.VARIANCES:
            raise ValueError(f"variance: expected one of {sorted(ops.VARIANCES)}, got {variance!r}")
        ops.check_clip_rule(clip_rule)
        self.model = model
        self.schedule = schedule
        self.precision = precision
        self.channels_last = channels_last
        self.variance = variance
        self.kind = sampler
        self.eta = float(eta)
        self.clip_x0 = bool(clip_x0)
        self.clip_rule = clip_rule
        self.guidance = guidance
        self.timesteps = sampling_timesteps(schedule.T, sampler, steps)
        prev = torch.full((schedule.T,), -1, dtype=torch.long)
        prev[self.timesteps[:-1]] = torch.tensor(self.timesteps[1:], dtype=torch.long)
        self.prev_step = prev.to(schedule.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, StepBuffers]] = {}
        self.graph_failed = False  # a capture failed: this sampler runs eagerly from now on

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def capturable(self) -> bool:
        """DDIM with eta > 0 draws its noise on the host (no DDIM kernel yet)."""
        return self.kind == "ddpm" or self.eta == 0.0

    def graph_unavailable(self, device: torch.device) -> str | None:
        """Why this sampler's step cannot be captured on ``device`` (None: it can)."""
        if not self.capturable:
            return "DDIM with eta > 0 draws its noise on the host"
        if self.graph_failed:
            return "an earlier capture of this sampler's step failed"
        return cuda_graphs.unavailable_reason(device)

    def predict(self, buf: StepBuffers) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, None) of the model at the buffers' z and t; guided: (eps_c, eps_u), views of
        one model call on the 2B rows [z; z], [t; t], [y; null]."""
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
        """One reverse step on the static buffers, advancing t and the seed in place."""
        with phase("sampler step"):
            pred, uncond = self.predict(buf)
            scale = 1.0 if uncond is None else self.guidance.scale
            t_prev = self.prev_step[buf.t]
            if self.kind == "ddpm":
                ops.reverse_step(
                    buf.z,
                    pred,
                    buf.t,
                    self.schedule,
                    seed=buf.seed,
                    variance=self.variance,
                    clip_x0=self.clip_x0,
                    validate=False,
                    out=buf.z,
                    pred_uncond=uncond,
                    guidance_scale=scale,
                )
            else:
                ops.ddim_step(
                    buf.z,
                    pred,
                    buf.t,
                    t_prev,
                    self.schedule,
                    seed=buf.seed,
                    eta=self.eta,
                    clip_x0=self.clip_x0,
                    clip_rule=self.clip_rule,
                    validate=False,
                    out=buf.z,
                    pred_uncond=uncond,
                    guidance_scale=scale,
                )
            buf.t.copy_(t_prev)
            buf.seed.add_(1)

    def run_eager(self, buf: StepBuffers, on_step=None) -> torch.Tensor:
        """Run every step on ``buf``; ``on_step()`` is called after each (progress bars)."""
        for _ in range(self.num_steps):
            self.step(buf)
            if on_step is not None:
                on_step()
        return buf.z

    def buffers(self, z: torch.Tensor, seed: int, labels=None) -> StepBuffers:
        """Static buffers for a batch starting from latents z at the first step."""
        return StepBuffers(z, self.timesteps[0], seed, labels, self.guidance)

    def run_graph(
        self, z0: torch.Tensor, seed: int, on_step=None, strict: bool = False, labels=None
    ) -> torch.Tensor:
        """Capture the step once for this batch size (cached), then replay it per step;
        ``on_step()`` is called after each replay is queued (the GPU may still be behind).
        If the capture fails (a model that cannot be captured), the chain runs eagerly from
        z0 after one log line (``cuda_graphs.capture``), or raises when ``strict``.
        ``labels`` (B,): the batch's classes (conditional model; None: the null class)."""
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
            buf.z.copy_(z0)
            buf.set_labels(labels, self.guidance)
            buf.t.fill_(self.timesteps[0])
            buf.seed.fill_(seed)
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
    """The 0-based step indices a sampler visits, first (T-1) to last (0)."""
    if sampler == "ddpm":
        return list(range(T - 1, -1, -1))
    steps = min(steps or 50, T)
    return sorted({round(i * (T - 1) / max(steps - 1, 1)) for i in range(steps)}, reverse=True)


def initial_noise(shape, device, seed: int, batch_index: int, channels_last: bool):
    """z_T for one batch: standard normal from a generator seeded by (seed, batch_index)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)
    z = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return z.contiguous(memory_format=memory_format(channels_last))


def run_sampler(
    sampler: Sampler,
    n: int,
    image_shape: tuple[int, int, int],
    device: torch.device,
    *,
    seed: int,
    batch_size: int,
    cuda_graph: bool,
    progress: bool = False,
    strict: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """n images (n, C, H, W) in [-1, 1], float32 on ``device``, batch by batch; ``labels``
    (n,): the class of each image (a conditional model; None: the null class).

    With ``cuda_graph`` on CUDA the step is captured and replayed (``Sampler.run_graph``);
    where it cannot be, the chain runs eagerly after one log line, or raises when ``strict``.
    """
    use_graph = cuda_graph and cuda_graphs.on_cuda(device)
    reason = sampler.graph_unavailable(device) if use_graph else None
    if reason is not None:
        cuda_graphs.fall_back("sampling: cuda_graph", reason, strict)
        use_graph = False
    batches = math.ceil(n / batch_size)
    bar = progress_bar(batches * sampler.num_steps, desc="sampling", unit="step", enabled=progress)
    out = []
    with torch.inference_mode():
        for b in range(batches):
            size = min(batch_size, n - b * batch_size)
            z0 = initial_noise((size, *image_shape), device, seed, b, sampler.channels_last)
            step_seed = seed * _SEED_STRIDE + b * _BATCH_STRIDE
            y = None if labels is None else labels[b * batch_size : b * batch_size + size]
            y = None if y is None else y.to(device)
            if use_graph:
                z = sampler.run_graph(z0, step_seed, on_step=bar.update, strict=strict, labels=y)
            else:
                z = sampler.run_eager(sampler.buffers(z0, step_seed, y), on_step=bar.update)
            out.append(z.float().clamp_(-1.0, 1.0).contiguous())
    bar.close()
    return torch.cat(out)


def check_sample_args(n, batch_size, seed, steps, sampler, eta, T) -> int:
    """Validate sample()'s arguments before any work; returns the batch size to use."""
    require_int("n", n)
    batch_size = require_int("batch_size", min(n, 256) if batch_size is None else batch_size)
    require_int("seed", seed, 0, 2**31 - 1)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ddpm" and steps is not None and steps != T:
        raise ValueError(
            f"steps: the ddpm sampler runs all T={T} steps of the trained schedule, got {steps};"
            " use sampler='ddim' for fewer"
        )
    if steps is not None:
        require_int("steps", steps, 1, T)
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected a number in [0, 1], got {eta!r}")
    if T > _BATCH_STRIDE:
        raise ValueError(f"schedule: at most {_BATCH_STRIDE} steps are supported, got T={T}")
    return batch_size


def check_guidance_args(num_classes: int | None, labels, guidance_scale, n: int):
    """sample()'s ``labels`` / ``guidance_scale`` for a model with ``num_classes`` (None:
    unconditional), checked before any work: (labels (n,) int64 CPU tensor or None, Guidance
    or None).  ``labels``: an int (every image) or one per image; None with a conditional
    model means the null class (the unconditional model; the scale is then moot)."""
    if num_classes is None:
        if labels is not None:
            raise ValueError("labels: this model is unconditional (no num_classes); omit labels")
        if guidance_scale not in (None, 1, 1.0):
            raise ValueError(
                f"guidance_scale: needs a class-conditional model, got {guidance_scale!r}"
            )
        return None, None
    if guidance_scale is None:
        guidance_scale = DEFAULT_GUIDANCE_SCALE
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale: expected a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    if labels is None:
        return None, Guidance(num_classes, 1.0)
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = [labels] * n
    labels = check_labels(labels, n, num_classes, name="labels")
    return labels, Guidance(num_classes, float(guidance_scale))
