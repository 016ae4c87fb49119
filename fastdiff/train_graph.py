"""The whole training step as one CUDA graph: captured once, replayed once per step.

A replayed graph re-runs recorded kernels on fixed memory; it cannot read a Python number
that changes per step.  So every per-step value lives in device memory and the step advances
it itself, from a device step counter k:

    x       = data[perm[pos : pos + B]], pos += B   in-memory data: the epoch's permutation
                                                    and the position are device tensors
            = the static input buffer               streamed data: the next batch is copied
                                                    into it before the replay
    y       = labels[perm[pos : pos + B]]           conditional runs, beside x (streamed: a
                                                    static label buffer)
    t       ~ U{0..T-1}                             the run's t generator, registered with
                                                    the graph (replays advance its offset)
    y'      = y, or the null class w.p. p           the run's label generator, registered
                                                    likewise (training._Run.loss_backward)
    seed_k  = seed * 2**32 + k * world + rank       training.step_seed
    lr_k    = lr * min(1, (k + 1) / warmup_steps)   written into the optimizer's lr tensor
              (* cosine decay with lr_schedule="cosine": lr_schedule below)
    decay_k = min(ema_decay, (1+k) / (k+g+2))       EMA.decay_at (g: ema_power)
    losses[k % log_every] = loss;  k += 1

The rest is the eager step (training._Run.train_step): q_sample, forward under autocast,
noise_loss, backward, the GradScaler (scale, inf check and scale update all stay on the
device), clip_grad_norm_ (the total norm and the clamped coefficient are device tensors),
fused capturable AdamW (reads lr, grad scale and found_inf from device memory), EMA.  Nothing
in the step synchronises with the host, and a replay allocates nothing: the graph owns its
memory, gradients included (they stay allocated between replays; backward writes them).

Life cycle (:class:`GraphStep`): ``WARMUP_STEPS`` real training steps run the same step
function eagerly on a side stream (Triton compilation, AdamW state, the scale tensor,
cuBLAS/cuDNN set-up), the last of them followed by the capture; every later step is one
replay.  Data order, t and noise are those of the eager step, so graph and eager runs see the
same batches, steps and noise; they differ only in rounding (lr in fp32, the EMA update as
sub/mul/add instead of lerp).  Resume is exact: the counter is set from the checkpoint's step,
the generators' states and the data position are the eager run's.

On other devices the same step function runs eagerly; training there uses the eager step
(``fastdiff.train`` builds a GraphStep only on CUDA), the CPU tests run this one against it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref

import torch

from . import cuda_graphs
from .data import InMemoryBatches
from .precision import memory_format
from .profiling import phase

logger = logging.getLogger("fastdiff")

#: Eager runs of the step function before the capture (each one a real training step).
WARMUP_STEPS = 3


# -- the per-step values as functions of the device step counter ------------------------------


def lr_schedule(
    step: torch.Tensor,
    lr: float,
    warmup_steps: int,
    schedule: str = "constant",
    total_steps: int = 0,
) -> torch.Tensor:
    """lr * min(1, (k + 1) / warmup_steps) for the int64 step counter k (lr when warmup_steps
    is 0), float64 shaped like k; with ``schedule="cosine"`` also times
    0.5 (1 + cos(pi p)), p = clamp((k - warmup_steps) / (total_steps - warmup_steps), 0, 1),
    which decays to 0 at the last step.  ``training._Run.lr_at(k)`` is this function on the
    host, so eager and graph steps use the same lr."""
    k = step.double()
    if warmup_steps == 0:
        rate = torch.full_like(k, lr)
    else:
        rate = ((k + 1.0) / warmup_steps).clamp(max=1.0) * lr
    if schedule == "cosine":
        progress = ((k - warmup_steps) / max(total_steps - warmup_steps, 1)).clamp(0.0, 1.0)
        rate = rate * (0.5 * (1.0 + torch.cos(math.pi * progress)))
    return rate


def ema_decay(step: torch.Tensor, decay: float, power: float) -> torch.Tensor:
    """min(decay, (1 + k) / (k + power + 2)), float64 shaped like k: bit for bit
    ``EMA.decay_at(k)``."""
    k = step.double()
    return ((k + 1.0) / (k + (power + 2.0))).clamp(max=decay)


def step_seed(step: torch.Tensor, run_seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The noise seed of step k on ``rank``, run_seed * 2**32 + k * world + rank (int64):
    ``training.step_seed`` on the device."""
    return step * world + (run_seed * 2**32 + rank)


# -- when a run uses it -------------------------------------------------------------------------


#: What the log line and the strict-mode error of a training-step fallback name.
WHAT = "training step: cuda_graph"


def graph_enabled(requested: bool, device: torch.device, dist, strict: bool = False) -> bool:
    """Whether a run with ``cuda_graph=requested`` on ``device`` replays a captured step.

    Only on CUDA (``cuda_graphs.on_cuda``), and only where the step can be captured: the
    fused ops on their Triton path (``cuda_graphs.unavailable_reason``).  Multi-process (DDP)
    runs take the eager step on every rank: DDP's gradient all-reduce is not captured here
    (torch supports it only with NCCL >= 2.9.6, DDP built on a side stream and 11 warm-up
    iterations, and it is fragile).  Each fallback logs one line (rank 0), or raises
    ``cuda_graphs.GraphCaptureError`` when ``strict``.
    """
    if not requested or not cuda_graphs.on_cuda(device):
        return False
    reason = cuda_graphs.unavailable_reason(device)
    if dist.enabled:
        reason = "multi-process (DDP) training is not captured with DDP's all-reduce"
    if reason is not None:
        if dist.is_main or strict:
            cuda_graphs.fall_back(WHAT, reason, strict)
        return False
    return True


# -- the step's input images ------------------------------------------------------------------


class _DeviceIndexedBatches:
    """In-memory data: the step gathers its batch itself, from the epoch's permutation (a
    device copy of ``InMemoryBatches``' own) at a device position it advances.

    ``prepare()`` (host, before each step) keeps the InMemoryBatches' bookkeeping, so its
    state_dict (the checkpointed data order) stays exact; it copies a new permutation in only
    when one starts (new epoch, or a restored position).
    """

    def __init__(self, batches: InMemoryBatches, fmt: torch.memory_format):
        self.batches, self.fmt = batches, fmt
        dev = batches.device
        self.offsets = torch.arange(batches.batch_size, device=dev)
        self.pos = torch.zeros((), dtype=torch.int64, device=dev)
        self.perm: torch.Tensor | None = None  # static: the graph reads it
        self._source: torch.Tensor | None = None  # the permutation tensor copied into perm

    def prepare(self) -> None:
        perm, start = self.batches.next_indices()
        if perm is not self._source:
            if self.perm is None:
                self.perm = torch.empty_like(perm)
            self.perm.copy_(perm)
            self.pos.fill_(start)
            self._source = perm

    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's images and their labels (None: unlabelled data)."""
        index = self.perm.index_select(0, self.offsets + self.pos)
        self.pos.add_(self.batches.batch_size)
        labels = self.batches.labels
        labels = None if labels is None else labels.index_select(0, index)
        return self.batches.data.index_select(0, index).contiguous(memory_format=self.fmt), labels


class _StaticInput:
    """Streamed data (DataLoader): each batch (and its labels) is copied into static device
    buffers before the step; the graph reads the buffers."""

    def __init__(self, batches, fmt: torch.memory_format):
        self.batches = batches
        shape = (batches.batch_size, *batches.image_shape)
        self.buffer = torch.empty(shape, device=batches.device, memory_format=fmt)
        self.labels: torch.Tensor | None = None

    def prepare(self) -> None:
        images, labels = self.batches.next_labelled()
        self.buffer.copy_(images, non_blocking=True)
        if labels is not None:
            if self.labels is None:
                self.labels = torch.empty_like(labels)
            self.labels.copy_(labels, non_blocking=True)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.buffer, self.labels


# -- the step -----------------------------------------------------------------------------------


class GraphStep:
    """The training step of a ``training._Run`` with every per-step value on the device.

    ``step()`` runs one training step: on CUDA the first ``WARMUP_STEPS`` run the step
    function eagerly on a side stream and the last of them is followed by the capture; later
    steps replay the graph.  Elsewhere every step runs the function eagerly.  The run's
    ``step`` (a Python int) is the host's count: when it differs from what the device counter
    holds (a restored checkpoint), the counter is set from it before the step.

    The optimizer must be AdamW built with ``fused=True, capturable=True``; ``_bind`` points
    its lr at this step's lr tensor (again after a ``load_state_dict`` replaced its state,
    which also makes the step warm up and capture afresh).
    """

    def __init__(self, run, strict: bool = False):
        # A weak reference: the run owns this step, and a cycle between them would keep the
        # graph, its memory pool and the optimizer state alive after train() returns, until
        # the cycle collector happened to run.
        self._run = weakref.ref(run)
        self.strict = strict
        dev = run.device
        self.capture = cuda_graphs.on_cuda(dev)  # False for good once a capture failed
        self.counter = torch.zeros((), dtype=torch.int64, device=dev)  # k, advanced by the step
        self.lr = torch.tensor(run.cfg.lr, dtype=torch.float32, device=dev)
        fmt = memory_format(run.channels_last)
        if isinstance(run.batches, InMemoryBatches):
            self.inputs = _DeviceIndexedBatches(run.batches, fmt)
        else:
            self.inputs = _StaticInput(run.batches, fmt)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._counter_step = 0  # the run step the device counter holds
        self._eager_left = WARMUP_STEPS
        self._bound: tuple | None = None  # (param_groups, state) the lr tensor is bound into
        self._stream = cuda_graphs.side_stream(dev) if self.capture else None
        # The weights a replay rewrites in place (the model's and the EMA's): see publish().
        shadow = run.ema.shadow
        self._written = [*run.model.parameters(), *shadow.parameters(), *shadow.buffers()]
        self._replayed = False

    @property
    def run(self):
        return self._run()

    def release(self) -> None:
        """Drop the graph (and with it its memory pool); a later step warms up again."""
        self.graph = None
        self._eager_left = WARMUP_STEPS

    def step(self) -> None:
        """One training step (the caller advances ``run.step``)."""
        run = self.run
        with self._device():
            if not self._is_bound():
                self._bind()
            if run.step != self._counter_step:
                self.counter.fill_(run.step)
            self.inputs.prepare()
            if self.graph is not None:
                self.graph.replay()
                self._replayed = True
            else:
                self._eager()
                # No capture for a run that ends with this step (nothing would replay it).
                if self.capture and self._eager_left == 0 and run.step + 1 < run.cfg.steps:
                    self._capture()
            self._counter_step = run.step + 1

    def publish(self) -> None:
        """Make replayed weight updates visible to caches keyed on version counters.

        A replay writes through raw pointers, so unlike an eager step it does not bump the
        tensors' version counters, and a cache keyed on them (a user's; fastdiff's bf16
        sampling copy no longer is: it copies the weights at every call) would keep serving
        old weights.  Bumping them costs ~15 us for 500 tensors, so it is done here, when the
        weights are handed out (``_Run.diffusion``), not on every step.
        """
        if self._replayed:
            torch.autograd.graph.increment_version(self._written)
            self._replayed = False

    def _device(self):
        return torch.cuda.device(self.run.device) if self.capture else contextlib.nullcontext()

    def _is_bound(self) -> bool:
        opt = self.run.optimizer
        return self._bound is not None and (
            self._bound[0] is opt.param_groups and self._bound[1] is opt.state
        )

    def _bind(self) -> None:
        """Point the optimizer at the lr tensor, make it fused and capturable, and put its
        state where the fused kernel reads it; (re)start warm-up and capture.

        A state loaded from an eager or CPU run's checkpoint keeps ``step`` where that run had
        it (torch moves it to the parameter's device only for optimizers that were capturable
        or fused when saved): the fused kernel would then read a host pointer, or the counter
        would not advance inside the graph.  So every state tensor goes to its parameter's
        device, ``step`` as float32 (what fused AdamW keeps), the moments in the parameter's
        dtype.
        """
        opt = self.run.optimizer
        for group in opt.param_groups:
            group.update(lr=self.lr, capturable=True, fused=True, foreach=None)
            for p in group["params"]:
                state = opt.state.get(p, {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        dtype = torch.float32 if key == "step" else p.dtype
                        state[key] = value.to(device=p.device, dtype=dtype)
        self._bound = (opt.param_groups, opt.state)
        self.release()

    def _eager(self) -> None:
        self.run.optimizer.zero_grad(set_to_none=True)
        if self.capture:
            cuda_graphs.run_on(self._stream, self._body, self.run.device)
        else:
            self._body()
        self._eager_left = max(0, self._eager_left - 1)

    def _capture(self) -> None:
        """Capture the step for the next steps to replay.  If the capture fails (a model that
        reads tensors on the host, say), the run goes on with eager steps from the state it
        had before the capture (see ``cuda_graphs.capture``), or raises in strict mode."""
        run = self.run
        # Gradients set to None now are allocated by the captured backward in the graph's
        # memory pool and stay there: each replay's backward writes them afresh.
        run.optimizer.zero_grad(set_to_none=True)
        self.graph = cuda_graphs.capture(
            self._body,
            device=run.device,
            what=WHAT,
            strict=self.strict,
            # The default generator (dropout) is registered implicitly.
            generators=[run.t_gen] + ([run.label_gen] if run.num_classes is not None else []),
            restore=run.forget_partial_step,
        )
        if self.graph is None:
            self.capture = False

    def _body(self) -> None:
        """The step function: what is captured and replayed (see the module docstring)."""
        run, cfg, k = self.run, self.run.cfg, self.counter
        with phase("data"):
            x, y = self.inputs.batch()
            t = torch.randint(
                0, run.schedule.T, (x.shape[0],), device=run.device, generator=run.t_gen
            )
            run.seed_buf.copy_(step_seed(k, cfg.seed, run.dist.rank, run.dist.world))
        loss = run.loss_backward(x, t, y, autocast_cache=False)
        with phase("optimizer"):
            self.lr.copy_(lr_schedule(k, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps))
            run.clipped_update()
        with phase("EMA"):
            run.ema.update_with((1.0 - ema_decay(k, run.ema.decay, run.ema.power)).float())
        run.losses.index_copy_(0, (k % cfg.log_every).reshape(1), loss.detach().reshape(1))
        k.add_(1)
