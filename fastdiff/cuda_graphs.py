"""CUDA graphs for the training step and the sampler: where one can run, how a step is
captured, and what happens when it cannot be.

Both captured steps (``train_graph.GraphStep``, ``samplers.SamplerRunner``) go through
:func:`capture` and :func:`fall_back`, so they share one set of rules:

* **Where.** Only on CUDA (:func:`on_cuda`), and only when the fused ops take the Triton path
  there (:func:`unavailable_reason`): the torch reference (``FASTDIFF_BACKEND=reference``, or
  Triton not importable) turns a seed tensor into Python noise with ``int(seed)``, a host read
  that a capture forbids.
* **How.** Each capture runs on a new stream object of the step's own device (torch's default
  capture stream is made once, on whichever device was current first), in
  ``capture_error_mode="thread_local"`` (a DataLoader's pin-memory thread may allocate pinned
  host memory meanwhile), with the step's generators registered with the graph.
* **When it fails** (a user model that calls ``.item()``, branches on a tensor in Python,
  allocates differently per call or uses an op CUDA graphs do not support), nothing of the
  capture is kept: the generators get back the state they had before it, the caller's
  ``restore`` undoes host-side state the step function touched, and the step runs eagerly
  from there, after one log line naming the cause.  A failed capture also leaves torch's own
  state half-open, since ``CUDAGraph.capture_end`` raises before its bookkeeping: the
  generators stay in capture mode (torch <= 2.12: the next eager draw, or the replay of any
  other graph, raises "Offset increment outside graph capture encountered unexpectedly") and
  the caching allocator keeps the graph's private pool. :func:`capture` closes both
  (:func:`_end_generator_capture`, :func:`_release_pool`).
* **Strict.** ``strict=True`` (or ``FASTDIFF_STRICT=1`` when ``strict`` is None) turns every
  such fallback into a :class:`GraphCaptureError`, so a benchmark never times an eager
  fallback by mistake.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

from .errors import FastDiffError

logger = logging.getLogger("fastdiff")

STRICT_ENV = "FASTDIFF_STRICT"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class GraphCaptureError(FastDiffError, RuntimeError):
    """A CUDA graph was asked for in strict mode and the step cannot be captured."""


def strict_mode(strict: bool | None = None) -> bool:
    """``strict`` when given, else the ``FASTDIFF_STRICT`` environment variable (off by
    default)."""
    if strict is not None:
        if not isinstance(strict, bool):
            raise TypeError(f"strict: expected True, False or None, got {strict!r}")
        return strict
    value = os.environ.get(STRICT_ENV, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{STRICT_ENV}: expected 1 or 0, got {value!r}")
    return value in _TRUE


def on_cuda(device: torch.device) -> bool:
    """Whether ``device`` runs captured graphs (CUDA).  The CPU tests' graph emulation
    replaces this predicate; production code asks it, never ``device.type`` directly."""
    return device.type == "cuda"


def unavailable_reason(device: torch.device) -> str | None:
    """Why a step with the fused ops cannot be captured on ``device`` (None: it can)."""
    from . import ops  # ops imports nothing of this module; keep the import graph one-way

    if ops.backend_on(device) != "triton":
        return (
            f"the fused ops run the torch reference on {device} ({ops.BACKEND_ENV}="
            f"{os.environ.get(ops.BACKEND_ENV, 'auto') or 'auto'}"
            f"{'' if ops.triton_available() else ', Triton not installed'}), which reads"
            " the noise seed on the host"
        )
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register a generator with a CUDA graph"
    return None


def fall_back(what: str, reason: str, strict: bool) -> None:
    """Say once that ``what`` runs eagerly because of ``reason``; raise in strict mode."""
    if strict:
        raise GraphCaptureError(
            f"{what}: {reason}; strict mode ({STRICT_ENV}=1 or strict=True) refuses the"
            " eager fallback"
        )
    logger.warning(f"fastdiff: {what}: {reason}; running it eagerly")


def describe(exc: BaseException) -> str:
    """The first cause of a failed capture, in one line: the error the step raised, not the
    "capture invalidated" that ending the capture raises after it."""
    root = exc
    while root.__context__ is not None and root.__cause__ is None:
        root = root.__context__
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}".rstrip(": ")


def side_stream(device: torch.device):
    """A new stream on ``device`` (warm-up steps and the capture run there)."""
    return torch.cuda.Stream(device=device)


def run_on(stream, fn: Callable[[], None], device: torch.device) -> None:
    """``fn()`` on ``stream``, ordered after and before the device's current stream."""
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        fn()
    current.wait_stream(stream)


def capture(
    body: Callable[[], None],
    *,
    device: torch.device,
    what: str,
    strict: bool,
    generators: Sequence[torch.Generator] = (),
    restore: Callable[[], None] | None = None,
):
    """Capture ``body()`` as a CUDA graph on ``device``; the graph, or None when the capture
    failed (after :func:`fall_back`: the step should then run eagerly).

    On failure every generator in ``generators`` gets its pre-capture state back and
    ``restore()`` is called, so the eager step continues from exactly the state before.
    """
    graph = torch.cuda.CUDAGraph()
    states = [g.get_state() for g in generators]
    for g in generators:
        graph.register_generator_state(g)
    pool = torch.cuda.graph_pool_handle()  # named, so that a failed capture's can be released
    stream = side_stream(device)  # a new one: a failed capture may leave its stream unusable
    previous = torch.cuda.current_stream(device)
    stream.wait_stream(previous)
    _clear_cublas_workspaces()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            body()
    except Exception as exc:  # noqa: BLE001 - any failure of a user's step means: run eagerly
        # torch.cuda.graph restores the stream only when the capture itself ended well (the
        # step raised a plain Python error, no illegal CUDA call): then the graph's pool and
        # the generators were released as usual; otherwise capture_end raised before that.
        ended = torch.cuda.current_stream(device) == previous
        if not ended:
            torch.cuda.set_stream(previous)
        del graph
        if not ended:
            _release_pool(device, pool)
            _end_generator_capture(device, generators)
        _clear_cublas_workspaces()
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)
        if restore is not None:
            restore()
        failure = f"the capture failed ({describe(exc)})"
        if strict:
            fall_back(what, failure, strict)  # raises here, chained to the step's own error
    else:
        failure = None
    if failure is not None:
        # Out of the except block, its traceback (which held the failed step's activations)
        # is gone: the blocks they leave behind go back to the GPU instead of staying
        # reserved until some allocation runs out of memory.
        torch.cuda.empty_cache()
        fall_back(what, failure, strict)
        return None
    _clear_cublas_workspaces()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph


def _clear_cublas_workspaces() -> None:
    """Drop cuBLAS's per-stream workspaces, before and after every capture (as torch.compile's
    CUDA-graph trees do).  Before: the capture then allocates its workspace in its own pool,
    instead of embedding one from the general pool that eager work on a stream of the same
    handle allocated.  After: eager work does not reuse the graph's.  torch builds since
    2026-02 free every workspace of a stream when a graph captured on it is reset
    (pytorch#193402), which would pull a workspace from under a live graph that shared it:
    e.g. the training step's, when a sample grid's graph is dropped.  (Private torch API:
    skipped where absent.)"""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if callable(clear):
        clear()


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _release_pool(device: torch.device, pool) -> None:
    """Give back the private memory pool of a capture that failed.

    ``CUDAGraph.capture_end`` raises at ``cudaStreamEndCapture``, before it tells the caching
    allocator that the capture is over, and a graph only releases a pool whose capture ended:
    so the allocator would keep routing the capture stream's allocations to the dead pool and
    keep every block the capture allocated (up to a whole step's activations and gradients)
    reserved for the rest of the process.  This ends the pool's allocation and releases it, as
    ``torch.cuda.use_mem_pool`` does on exit (private torch API: skipped where absent; where
    the pool was already ended, torch refuses the first call and nothing is released twice).
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    if not (callable(end) and callable(release)):
        return
    index = _device_index(device)
    try:
        end(index, pool)
        release(index, pool)
    except RuntimeError as exc:
        logger.warning(f"fastdiff: the failed capture's memory pool stays reserved ({exc})")
        return
    torch.cuda.empty_cache()


def _end_generator_capture(device: torch.device, generators: Sequence[torch.Generator]) -> None:
    """Take the generators of a failed capture out of capture mode.

    Beginning a capture puts every generator registered with the graph, and the device's
    default CUDA generator, into capture mode; only a capture that ends well takes them out of
    it (``capture_epilogue``).  After a failed one, torch 2.4-2.12 raise "Offset increment
    outside graph capture encountered unexpectedly" at the next eager draw from any of them
    (the eager fallback's ``torch.randint``, dropout) and at the next replay of any other graph
    (a replay advances the default generator).  So: one tiny capture that ends well, with the
    same generators registered, runs their prologue and epilogue and leaves them as before the
    failed one (their offsets are restored by the caller).
    """
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    stream = side_stream(device)
    previous = torch.cuda.current_stream(device)
    stream.wait_stream(previous)
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            torch.zeros(1, device=device)  # one kernel: an empty graph warns
    except Exception as exc:  # noqa: BLE001 - say so; the caller's fallback still runs
        if torch.cuda.current_stream(device) != previous:
            torch.cuda.set_stream(previous)
        logger.warning(
            "fastdiff: could not take the random generators out of capture mode after a failed"
            f" capture ({describe(exc)}); random draws on {device} may fail from here"
        )
        return
    previous.wait_stream(stream)
