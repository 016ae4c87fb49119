"""A CPU emulation of torch.cuda's CUDA-graph API, for tests without a GPU.

``install(monkeypatch)`` replaces ``torch.cuda.CUDAGraph``, ``torch.cuda.graph``,
``torch.cuda.Stream``, ``torch.cuda.current_stream``, ``torch.cuda.stream``,
``torch.cuda.device``, ``torch.cuda.synchronize``, ``torch.cuda.graph_pool_handle`` (and
``torch.cuda.is_current_stream_capturing``) by emulations that run on CPU tensors, and returns
the ``Emulator`` that records what production code did with them (graphs, captures, replays,
streams, devices entered: see ``Emulator``).

What a real GPU would do, and so what the emulation does:

1. Capture records, it does not compute.  Inside ``torch.cuda.graph(g)`` every dispatched op
   is recorded by a ``TorchDispatchMode`` (the op, its arguments and its results; tensors by
   reference: they are the graph's fixed addresses).  The ops do run, so that the Python code
   gets results of the right shapes, but at the end of the capture (succeeded or failed) every
   tensor that existed before the capture and was written during it is restored to its value
   before the capture (its storage is saved before the first op that writes it: the op schema's
   ``alias_info.is_write``, Tensor lists included; a non-aten op, such as a
   ``torch.library.custom_op``, gets all its tensor arguments saved whatever it declares), and
   so are the states of the graph's registered generators and of the default CPU generator.
   The tensors the capture allocated (the graph's pool) are then filled with garbage (NaN for
   floating point, the dtype's maximum for integers, True for bool): on a GPU they hold
   whatever the memory held until the first replay writes them (``install(...,
   poison_pool=False)`` leaves the values the capture computed).
2. ``replay()`` re-executes the record, not the Python: each recorded op runs again, in order,
   on the same tensor objects, below autograd (no version-counter bump, no autocast: as on a
   GPU, where a replay is kernels writing through pointers).  A result that does not alias an
   input (the schema's return has no ``alias_info``) is copied into the tensor recorded at
   capture, so later ops and the Python code holding that tensor see the new values; a result
   whose shape or dtype differs from the recorded one raises.  ``empty*`` ops (no kernel on a
   GPU) are not re-run.  Random ops advance their generators at each replay, so N replays draw
   what N eager steps draw.  Python values read at capture (a float, a shape, a branch taken)
   are frozen into the record.
3. Host reads raise during capture with "operation not permitted when stream is capturing":
   ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, an ``if``
   on a tensor), ``aten.equal``/``allclose``, the ops whose result size depends on the data
   (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ...),
   ``Tensor.tolist()`` and printing a tensor (neither dispatches an op: both are patched), and
   ``torch.cuda.synchronize()`` / ``Stream.synchronize()`` / ``Stream.query()`` (allowed with
   ``capture_error_mode="relaxed"``, except on the capturing stream).  A non-aten op (a
   custom op) is recorded as one op, and its implementation runs under a nested mode that
   raises on scalar host reads (it leaves ``.numpy()``/``.cpu()`` alone: the Triton
   interpreter uses them inside custom ops).  As on a GPU, such an error invalidates the
   capture even if the Python code catches it.
4. An op given an explicit ``generator=`` that is neither registered with the graph
   (``register_generator_state``) nor the default generator raises during capture.
5. Ops that copy between devices or touch pinned memory (``_to_copy`` to another device,
   ``copy_`` from another device, ``_pin_memory``, ``pin_memory=True``) raise during capture.
   The tensors created during capture are kept alive by the graph (its pool) until ``reset()``
   or until the graph is dropped.
6. Generators and pools after a failed capture, as torch 2.4-2.12 leave them (the GPU
   machine's torch is 2.11; ``CUDAGraph.capture_end`` raises before its bookkeeping): a capture
   puts its registered generators and the default generator in capture mode, and only a
   capture that succeeds takes them out again.  While a generator is left in capture mode, an
   eager random op drawing from it (its ``generator=`` argument, or the default generator
   for an op tagged ``nondeterministic_seeded`` given none) and the replay of any graph it
   belongs to (the default one belongs to every graph) raise "Offset increment outside graph
   capture encountered unexpectedly".  A failed capture's pool stays allocating (``leaked_pools``)
   until ``torch._C._cuda_endAllocateToPool`` and ``_cuda_releasePool`` (emulated) end and
   release it.
7. A graph whose capture failed, or was reset, cannot be replayed; a graph holds one capture
   (capture again only after ``reset()``).  ``torch.cuda.graph`` takes ``pool=``, ``stream=``
   and ``capture_error_mode=`` (recorded per capture); capturing on a default stream raises,
   as on a GPU.
8. It works under ``torch.inference_mode()`` (composite ops that reach the mode whole are
   decomposed, so the ops they run are seen) and with autograd: a backward inside the capture
   dispatches its ops through the mode like any other.

Limitations: no timing; no real memory pool (no reuse of freed blocks within a capture, no
aliasing between graphs sharing a pool: ``pool=`` is only recorded); no cross-stream races
(streams only record who waited on whom; work runs at once, in program order); the "device"
is the CPU, so copies between CPU and GPU cannot be told apart from other ops beyond (5): a
``.cpu()``/``.numpy()`` of a device tensor, or a ``torch.tensor(data, device=...)`` built from
Python data during capture, is not caught (the latter becomes a constant of the record);
random ops use the CPU generators (mt19937), not Philox; a CPU op in production code (which on
a GPU would run at capture and never again) is recorded and replayed like a device op; ops run
by other threads are not recorded, and ``capture_error_mode="global"`` only makes
``torch.cuda.synchronize()`` on other threads raise; a custom op that writes tensors it was
not given (globals, closures) is not restored.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CaptureRecord",
    "Emulator",
    "EmulatedCUDAGraph",
    "EmulatedEvent",
    "EmulatedGraphContext",
    "EmulatedStream",
    "GraphRecord",
    "install",
]

_aten = torch.ops.aten

#: The error CUDA reports for an illegal operation during stream capture.
NOT_PERMITTED = "operation not permitted when stream is capturing"

#: Ops that hand a tensor's value to the host (a device-to-host copy and a stream sync).
_SCALAR_HOST_READS = {
    _aten._local_scalar_dense.default,
    _aten.item.default,
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten.allclose.default,
}

#: Ops whose result size depends on the data: on CUDA they copy a count to the host and sync.
_DATA_DEPENDENT_SHAPES = {
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
    _aten.bincount.default,
    _aten._linalg_check_errors.default,
}

#: Ops that allocate without a kernel: nothing to re-run at replay (the memory keeps its bytes).
_NO_KERNEL = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
    _aten.empty_permuted.default,
}

_DK = torch._C.DispatchKey
_AUTOCAST_KEYS = torch._C.DispatchKeySet(_DK.AutocastCPU) | torch._C.DispatchKeySet(
    _DK.AutocastCUDA
)
_CPU_KEYS = torch._C.DispatchKeySet(_DK.CPU)


#: What torch 2.4-2.12 raise at a draw from a generator a failed capture left in capture mode.
OFFSET_OUTSIDE_CAPTURE = "Offset increment outside graph capture encountered unexpectedly"


class CaptureViolation(RuntimeError):
    """An operation CUDA refuses during stream capture."""


def _not_permitted(what: str) -> CaptureViolation:
    return CaptureViolation(
        f"CUDA error: {NOT_PERMITTED} ({what} during CUDA graph capture) [cuda_graph_emulation]"
    )


# -- records ------------------------------------------------------------------------------------


@dataclass
class CaptureRecord:
    """One capture: where it ran and how it ended.  Holds no tensors."""

    graph: int  #: index of the graph in ``Emulator.graphs``
    stream: EmulatedStream
    device: torch.device | None
    pool: Any
    capture_error_mode: str
    thread: int
    #: "capturing", then "succeeded", "failed" (an illegal call: capture_end raised) or
    #: "raised" (the step raised a plain Python error: the capture itself ended normally)
    status: str = "capturing"
    error: str | None = None  #: repr of the exception that failed it
    ops: list[str] = field(default_factory=list)  #: names of the recorded ops, in order
    restored: int = 0  #: how many pre-capture storages were written and restored


@dataclass
class GraphRecord:
    """One ``torch.cuda.CUDAGraph()``.  Holds no tensors (the graph's pool dies with it)."""

    index: int
    generators: int = 0  #: generators registered with register_generator_state
    captures: list[CaptureRecord] = field(default_factory=list)
    replays: int = 0
    resets: int = 0
    _graph: Any = field(default=None, repr=False)  # weakref to the EmulatedCUDAGraph

    @property
    def alive(self) -> bool:
        return self._graph() is not None


@dataclass
class _RecordedOp:
    func: Any
    args: tuple
    kwargs: dict
    fresh: list  # the results that alias no input, as recorded (flattened)


class EmulatedEvent:
    """What ``EmulatedStream.record_event`` returns (torch.cuda.Event is not emulated)."""

    def __init__(self, emulator: Emulator, stream: EmulatedStream | None = None):
        self._emulator, self.stream = emulator, stream

    def record(self, stream: EmulatedStream | None = None) -> None:
        self.stream = stream or self._emulator.current_stream()

    def wait(self, stream: EmulatedStream | None = None) -> None:
        (stream or self._emulator.current_stream()).wait_event(self)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self._emulator._host_sync("Event.synchronize", self.stream)


class EmulatedStream:
    """``torch.cuda.Stream``: records its device and the waits; work runs at once."""

    _emulator: Emulator  # set on the class ``install`` makes
    _ids = itertools.count(1)

    def __init__(self, device=None, priority: int = 0, **kwargs):
        emu = self._emulator
        self._init(emu._as_device(device), priority, default=False)
        emu.streams.append(self)
        emu.events.append(("stream_created", self))

    def _init(self, device, priority: int, default: bool) -> None:
        self.device = device
        self.priority = priority
        self.is_default = default
        self.stream_id = 0 if default else next(self._ids)
        self.cuda_stream = self.stream_id
        self.waited_on: list[EmulatedStream] = []  #: streams this one waited for, in order

    @classmethod
    def _default_stream(cls, device) -> EmulatedStream:
        stream = cls.__new__(cls)
        stream._init(device, 0, default=True)
        return stream

    def wait_stream(self, stream: EmulatedStream) -> None:
        self.waited_on.append(stream)
        self._emulator.events.append(("wait_stream", self, stream))

    def wait_event(self, event: EmulatedEvent) -> None:
        self._emulator.events.append(("wait_event", self, event))

    def record_event(self, event: EmulatedEvent | None = None) -> EmulatedEvent:
        event = event or EmulatedEvent(self._emulator)
        event.record(self)
        return event

    def synchronize(self) -> None:
        self._emulator._host_sync("Stream.synchronize", self)

    def query(self) -> bool:
        self._emulator._host_sync("Stream.query", self)
        return True

    def __repr__(self) -> str:
        kind = "default stream" if self.is_default else f"stream {self.stream_id}"
        return f"<EmulatedStream {kind} on {self.device}>"


# -- the dispatch modes -------------------------------------------------------------------------


def _is_composite_implicit(func) -> bool:
    """Only a composite op: one with a CPU (or explicit composite) kernel of its own, such as
    ``silu_backward``, runs that kernel eagerly, so it is recorded whole (decomposing it would
    replay other arithmetic than the eager step's)."""
    name = func.name()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has(name, torch._C.DispatchKey.CompositeImplicitAutograd) and not (
        has(name, "CPU") or has(name, "CompositeExplicitAutograd")
    )


def _has_cpu_kernel(func) -> bool:
    return torch._C._dispatch_has_computed_kernel_for_dispatch_key(func.name(), "CPU")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _arguments(func, args, kwargs):
    """(schema argument, value) for each argument of the call."""
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            yield arg, args[i]
        elif arg.name in kwargs:
            yield arg, kwargs[arg.name]


def _fresh_results(func, out) -> list:
    """The results that alias no input (flattened; None for an absent optional result)."""
    returns = func._schema.returns
    values = [out] if len(returns) == 1 else list(out or ())
    fresh: list = []
    for ret, value in zip(returns, values, strict=True):
        if ret.alias_info is None:
            if isinstance(value, (list, tuple)):
                fresh.extend(value)
            elif isinstance(value, torch.Tensor) or value is None:
                fresh.append(value)
    return fresh


def _storage_key(t: torch.Tensor):
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    return t.untyped_storage()._cdata


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).max)


class _HostReadGuard(TorchDispatchMode):
    """Runs a custom op's implementation: raises on scalar host reads, runs everything else."""

    def __init__(self, capture: _Capture, op):
        super().__init__()
        self.capture, self.op = capture, op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_composite_implicit(func):  # item, is_nonzero: seen as _local_scalar_dense
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func in _SCALAR_HOST_READS:
            raise self.capture.violation(
                _not_permitted(f"{func} inside custom op {self.op} reads tensor data on the host")
            )
        if func.namespace != "aten" and _has_cpu_kernel(func):
            with self:  # a custom op called by a custom op: guard its implementation too
                return func.redispatch(_CPU_KEYS, *args, **kwargs)
        return func(*args, **kwargs)


def _generator_of(func, args, kwargs) -> torch.Generator | None:
    """The generator a random op draws from (None: the op draws nothing): its ``generator``
    argument, else the default one for a random op (``randn.default``, ``native_dropout``:
    tagged ``nondeterministic_seeded``)."""
    for arg, value in _arguments(func, args, kwargs):
        if arg.name == "generator" and value is not None:
            return value
    if torch.Tag.nondeterministic_seeded in func.tags:
        return torch.default_generator
    return None


class _GeneratorsInCaptureGuard(TorchDispatchMode):
    """Active while a failed capture has left generators in capture mode (point 6): an eager
    random op drawing from one of them raises as torch does."""

    def __init__(self, emulator: Emulator):
        super().__init__()
        self.emulator = emulator

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        emu = self.emulator
        if emu.capturing() is None:
            gen = _generator_of(func, args, kwargs)
            if gen is not None and gen._cdata in emu.generators_in_capture:
                raise RuntimeError(f"{OFFSET_OUTSIDE_CAPTURE} ({func}) [cuda_graph_emulation]")
        return func(*args, **kwargs)


class _CaptureMode(TorchDispatchMode):
    """Records the ops of a capture (see the module docstring, points 1, 3-5)."""

    def __init__(self, capture: _Capture):
        super().__init__()
        self.capture = capture

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function ranges: host-side, never captured
            return func(*args, **kwargs)
        cap = self.capture
        if _is_composite_implicit(func):
            # Below autograd (inference_mode, backward) composite ops reach the mode whole:
            # decompose them so that the ops they run are checked and recorded one by one.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        cap.check(func, args, kwargs)
        cap.save_written(func, args, kwargs)
        if func.namespace != "aten" and _has_cpu_kernel(func):
            with _HostReadGuard(cap, func):
                out = func.redispatch(_CPU_KEYS, *args, **kwargs)
        else:
            out = _run_at_capture(func, args, kwargs)
        cap.add_op(func, args, kwargs, out)
        return out


def _run_at_capture(func, args, kwargs):
    """Run an aten op during capture.  If it fails on the values (an index out of range, say)
    while its shapes are fine, return uninitialised results of the shapes its meta kernel
    gives: on a GPU nothing runs at capture, and the values the capture sees (a batch position
    the next step's preparation will set, say) are not those of any replay."""
    try:
        return func(*args, **kwargs)
    except CaptureViolation:
        raise
    except (IndexError, RuntimeError) as exc:
        if any(ret.alias_info is not None for ret in func._schema.returns):
            raise
        to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
        try:
            meta = func(*torch.utils._pytree.tree_map(to_meta, (args, kwargs))[0],
                        **torch.utils._pytree.tree_map(to_meta, kwargs))  # fmt: skip
        except Exception:
            raise exc from None
        device = next(v.device for v in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(v, torch.Tensor))  # fmt: skip
        return torch.utils._pytree.tree_map(
            lambda m: torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device)
            if isinstance(m, torch.Tensor) else m,
            meta,
        )  # fmt: skip


class _Capture:
    """The state of one capture in progress."""

    def __init__(self, graph: EmulatedCUDAGraph, info: CaptureRecord):
        self.graph, self.info = graph, info
        self.emulator = graph._emulator
        self.ops: list[_RecordedOp] = []
        self.created: dict[int, torch.Tensor] = {}  # storage key -> a tensor of the pool
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}
        self.generators: dict[int, tuple[torch.Generator, torch.Tensor]] = {}
        self.default_rng = torch.get_rng_state()
        self.invalid: BaseException | None = None
        self.mode = _CaptureMode(self)

    def violation(self, error: CaptureViolation) -> CaptureViolation:
        """As on a GPU, an illegal call invalidates the capture even if Python catches it."""
        if self.invalid is None:
            self.invalid = error
        return error

    def add_generator(self, gen: torch.Generator) -> None:
        if gen._cdata not in self.generators:
            self.generators[gen._cdata] = (gen, gen.get_state())

    def check(self, func, args, kwargs) -> None:
        if func in _SCALAR_HOST_READS or func in _DATA_DEPENDENT_SHAPES:
            raise self.violation(_not_permitted(f"{func} reads tensor data on the host"))
        if func in (_aten.index.Tensor, _aten.index_put_.default, _aten._index_put_impl_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                raise self.violation(
                    _not_permitted(f"{func} with a boolean mask (a nonzero: data-dependent size)")
                )
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise self.violation(_not_permitted(f"{func} without output_size"))
        default = torch.default_generator._cdata
        for value in itertools.chain(args, kwargs.values()):
            if isinstance(value, torch.Generator):
                if value._cdata != default and value._cdata not in self.generators:
                    raise self.violation(
                        CaptureViolation(
                            f"{func} was given a generator that is not registered with the graph "
                            "being captured (CUDAGraph.register_generator_state) and is not the "
                            "default generator [cuda_graph_emulation]"
                        )
                    )
        if kwargs.get("pin_memory") or func is _aten._pin_memory.default:
            raise self.violation(_not_permitted(f"{func} allocates pinned host memory"))
        if func is _aten._to_copy.default and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]) != args[0].device:
                raise self.violation(_not_permitted(f"{func} copies between devices"))
        if func is _aten.copy_.default and args[1].device != args[0].device:
            raise self.violation(_not_permitted(f"{func} copies between devices"))

    def save_written(self, func, args, kwargs) -> None:
        """Save each pre-capture storage the op may write, before its first write."""
        if func.namespace == "aten":
            written = [
                t
                for arg, value in _arguments(func, args, kwargs)
                if arg.alias_info is not None and arg.alias_info.is_write
                for t in _tensors(value)
            ]
        else:  # a custom op's declaration is not trusted: save every tensor it is given
            written = [
                t for value in itertools.chain(args, kwargs.values()) for t in _tensors(value)
            ]
        for t in written:
            key = _storage_key(t)
            if key is None or key in self.created or key in self.saved:
                continue
            storage = t.untyped_storage()
            self.saved[key] = (storage, storage.clone())

    def add_op(self, func, args, kwargs, out) -> None:
        fresh = _fresh_results(func, out)
        for t in fresh:
            if isinstance(t, torch.Tensor) and (key := _storage_key(t)) is not None:
                self.created.setdefault(key, t)
        self.ops.append(_RecordedOp(func, args, kwargs, fresh))
        self.info.ops.append(str(func))

    def finish(self) -> None:
        """Undo what the capture computed: restore pre-capture tensors and generators, fill
        the pool with garbage."""
        for storage, copy in self.saved.values():
            storage.copy_(copy)
        self.info.restored = len(self.saved)
        for gen, state in self.generators.values():
            gen.set_state(state)
        torch.set_rng_state(self.default_rng)
        if self.emulator.poison_pool:
            with torch._C._AutoDispatchBelowADInplaceOrView():
                for op in self.ops:
                    for t in op.fresh:
                        if isinstance(t, torch.Tensor) and _storage_key(t) is not None:
                            _poison(t)
        self.saved.clear()


# -- the graph ----------------------------------------------------------------------------------


class EmulatedCUDAGraph:
    """``torch.cuda.CUDAGraph``: capture_begin/capture_end (or ``torch.cuda.graph``),
    replay, reset, pool, register_generator_state."""

    _emulator: Emulator  # set on the class ``install`` makes

    def __init__(self, keep_graph: bool = False):
        emulator = self._emulator
        self._ops: list[_RecordedOp] = []
        self._pool_tensors: dict[int, torch.Tensor] = {}  # the graph's pool: kept alive here
        self._generators: list[torch.Generator] = []
        self._capture: _Capture | None = None
        self._state = "empty"  # "empty", "capturing", "captured", "failed"
        self._pool = None
        self.record = GraphRecord(index=len(emulator.graphs), _graph=weakref.ref(self))
        emulator.graphs.append(self.record)
        emulator.events.append(("graph_created", self.record.index))

    @property
    def replay_count(self) -> int:
        return self.record.replays

    @property
    def recorded_ops(self) -> list[str]:
        return [str(op.func) for op in self._ops]

    def register_generator_state(self, generator: torch.Generator) -> None:
        self._generators.append(generator)
        self.record.generators += 1
        if self._capture is not None:
            self._capture.add_generator(generator)

    def pool(self):
        if self._pool is None:
            self._pool = self._emulator._new_pool_handle()
        return self._pool

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        emu = self._emulator
        if capture_error_mode not in ("global", "thread_local", "relaxed"):
            raise RuntimeError(f"Unknown capture_error_mode {capture_error_mode!r}")
        if self._state != "empty":
            raise RuntimeError(
                "This CUDAGraph instance already owns a captured graph. To capture a new graph, "
                "create a new instance (or reset() this one)."
            )
        if (outer := emu.capturing()) is not None:
            raise outer.violation(
                CaptureViolation(
                    "Cannot begin a CUDA graph capture while another capture is in progress on "
                    "this thread [cuda_graph_emulation]"
                )
            )
        stream = emu.current_stream()
        if stream.is_default:
            raise RuntimeError(
                "CUDA graphs must be captured on a non-default stream. (However, after capture, "
                "it's ok to replay them on the default stream.)"
            )
        if pool is not None:
            self._pool = pool
        record = CaptureRecord(
            graph=self.record.index,
            stream=stream,
            device=stream.device,
            pool=self.pool(),
            capture_error_mode=capture_error_mode,
            thread=threading.get_ident(),
        )
        self.record.captures.append(record)
        emu.captures.append(record)
        emu.events.append(("capture_begin", self.record.index, stream))
        cap = _Capture(self, record)
        for gen in self._generators:
            cap.add_generator(gen)
        emu._enter_generator_capture(self._generators)
        emu.pools_allocating.add(record.pool)
        self._capture, self._state = cap, "capturing"
        emu._local.capture = cap
        if capture_error_mode == "global":
            emu._global_captures += 1
        cap.mode.__enter__()

    def capture_end(self, error: BaseException | None = None) -> None:
        """End the capture (``error``: the exception that ended it, if any)."""
        emu, cap = self._emulator, self._capture
        if cap is None or emu.capturing() is not cap:
            raise RuntimeError("capture_end() without a capture in progress on this thread")
        try:
            cap.mode.__exit__(None, None, None)
        finally:
            emu._local.capture = None
            if cap.info.capture_error_mode == "global":
                emu._global_captures -= 1
            self._capture = None
            cap.finish()
            cap.mode = None  # no reference cycle: the pool must die with the graph, not at gc
        if cap.invalid is not None:  # an illegal call: cudaStreamEndCapture fails
            cap.info.status, cap.info.error = "failed", repr(cap.invalid)
            self._state = "failed"
            self._ops, self._pool_tensors = [], {}
            cap.ops, cap.created, invalid, cap.invalid = [], {}, cap.invalid, None
            emu.events.append(("capture_end", self.record.index, "failed"))
            emu._capture_failed()  # generators stay in capture mode, the pool allocating
            # As torch's capture_end: raised before any bookkeeping.  Raised in the graph
            # context's __exit__, it has the step's own error as its __context__; where Python
            # caught the illegal call, CUDA fails the capture all the same.
            message = (
                "CUDA error: operation failed due to a previous error during capture "
                "[cuda_graph_emulation]"
            )
            if error is None:
                raise RuntimeError(f"{message} ({invalid})") from invalid
            raise RuntimeError(message)
        # No illegal call (a plain Python error, or none): CUDA ends the capture normally and
        # torch keeps a graph of the ops recorded before any error.
        cap.info.status = "succeeded" if error is None else "raised"
        if error is not None:
            cap.info.error = repr(error)
        emu._exit_generator_capture(self._generators)
        emu.pools_allocating.discard(cap.info.pool)
        self._state = "captured"
        self._ops, self._pool_tensors = cap.ops, cap.created
        emu.events.append(("capture_end", self.record.index, "succeeded"))

    def replay(self) -> None:
        emu = self._emulator
        if self._state != "captured":
            raise RuntimeError(
                "Called CUDAGraph::replay without a preceding successful capture "
                f"(this graph is {self._state}) [cuda_graph_emulation]"
            )
        if emu.capturing() is not None:
            raise RuntimeError("CUDAGraph.replay() during a capture is not emulated")
        if any(g._cdata in emu.generators_in_capture for g in emu._with_default(self._generators)):
            raise RuntimeError(
                f"{OFFSET_OUTSIDE_CAPTURE} (replaying graph {self.record.index}: a failed"
                " capture left one of its generators in capture mode) [cuda_graph_emulation]"
            )
        with torch._C._AutoDispatchBelowADInplaceOrView():
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
                for op in self._ops:
                    if op.func in _NO_KERNEL:
                        continue
                    out = op.func(*op.args, **op.kwargs)
                    fresh = _fresh_results(op.func, out)
                    if len(fresh) != len(op.fresh):
                        raise RuntimeError(
                            f"CUDA graph replay: {op.func} returned {len(fresh)} tensors where "
                            f"the capture recorded {len(op.fresh)} [cuda_graph_emulation]"
                        )
                    for old, new in zip(op.fresh, fresh, strict=True):
                        if old is None or new is None:
                            continue
                        if old.shape != new.shape or old.dtype != new.dtype:
                            raise RuntimeError(
                                f"CUDA graph replay: {op.func} returned {new.dtype}"
                                f"{list(new.shape)} where the capture recorded {old.dtype}"
                                f"{list(old.shape)} [cuda_graph_emulation]"
                            )
                        old.copy_(new)
        self.record.replays += 1
        emu.replays += 1
        emu.events.append(("replay", self.record.index, emu.current_stream()))

    def reset(self) -> None:
        if self._state == "capturing":
            raise RuntimeError("CUDAGraph.reset() during its capture")
        self._ops, self._pool_tensors = [], {}
        self._state = "empty"
        self.record.resets += 1
        self._emulator.events.append(("reset", self.record.index))

    def enable_debug_mode(self) -> None:
        pass

    def debug_dump(self, path: str) -> None:
        with open(path, "w") as f:
            f.write("\n".join(self.recorded_ops))


# -- the emulator -------------------------------------------------------------------------------


class _DeviceContext:
    def __init__(self, emulator: Emulator, device):
        self._emulator = emulator
        self.device = None if device is None or device == -1 else emulator._as_device(device)

    def __enter__(self):
        emu = self._emulator
        emu.device_events.append(("enter", self.device))
        emu.events.append(("device_enter", self.device))
        emu._device_stack().append(self.device or emu.current_device())
        return self

    def __exit__(self, *exc):
        emu = self._emulator
        emu._device_stack().pop()
        emu.device_events.append(("exit", self.device))
        emu.events.append(("device_exit", self.device))
        return False


class _StreamContext:
    def __init__(self, emulator: Emulator, stream: EmulatedStream | None):
        self._emulator, self.stream = emulator, stream

    def __enter__(self):
        if self.stream is not None:
            emu = self._emulator
            # As torch.cuda.stream: the current device becomes the stream's for the block.
            emu._device_stack().append(self.stream.device)
            streams = emu._streams()
            self._prev = streams.get(self.stream.device)
            streams[self.stream.device] = self.stream
        return self.stream

    def __exit__(self, *exc):
        if self.stream is not None:
            emu = self._emulator
            streams = emu._streams()
            if self._prev is None:
                streams.pop(self.stream.device, None)
            else:
                streams[self.stream.device] = self._prev
            emu._device_stack().pop()
        return False


class Emulator:
    """What production code did with the emulated torch.cuda API.

    - ``graphs``: a ``GraphRecord`` per ``torch.cuda.CUDAGraph()`` (captures, replays, resets,
      generators registered, ``alive``); ``graphs_created`` counts them.
    - ``captures``: a ``CaptureRecord`` per capture started (graph, stream, device, pool,
      capture_error_mode, status "succeeded"/"failed", error, the recorded op names);
      ``captures_started`` / ``captures_succeeded`` / ``captures_failed`` count them.
    - ``replays``: replays of all graphs.
    - ``streams``: the ``EmulatedStream`` objects created (``torch.cuda.Stream(...)`` and the
      default capture stream of ``torch.cuda.graph`` without ``stream=``), each with ``device``.
    - ``device_events``: ``("enter", device)`` / ``("exit", device)`` per
      ``torch.cuda.device(...)`` block.
    - ``synchronizes``: the devices ``torch.cuda.synchronize`` was called for.
    - ``events``: everything above, in order (tuples starting with a name).
    """

    def __init__(self, default_device="cpu", poison_pool: bool = True):
        self.default_device = torch.device(default_device)
        self.poison_pool = poison_pool
        self.graphs: list[GraphRecord] = []
        self.captures: list[CaptureRecord] = []
        self.replays = 0
        self.streams: list[EmulatedStream] = []
        self.default_streams: dict[Any, EmulatedStream] = {}
        self.device_events: list[tuple[str, torch.device | None]] = []
        self.synchronizes: list[torch.device | None] = []
        self.events: list[tuple] = []
        self._capture_streams: dict[Any, EmulatedStream] = {}
        self._pools = itertools.count(1)
        #: generators in capture mode (``_cdata`` -> generator): see the module docstring, 6
        self.generators_in_capture: dict[int, torch.Generator] = {}
        #: pools of captures begun and not ended (a failed capture's, until released)
        self.pools_allocating: set = set()
        #: pools ended and released by ``torch._C._cuda_endAllocateToPool``/``_cuda_releasePool``
        self.pools_released: list = []
        self._guard: _GeneratorsInCaptureGuard | None = None
        self._local = threading.local()
        self._global_captures = 0
        # torch.cuda.Stream, torch.cuda.CUDAGraph and torch.cuda.graph are classes in torch
        # (code calls hasattr/isinstance on them): classes bound to this emulator.
        self.Stream = type("Stream", (EmulatedStream,), {"_emulator": self})
        self.CUDAGraph = type("CUDAGraph", (EmulatedCUDAGraph,), {"_emulator": self})
        self.graph = type("graph", (EmulatedGraphContext,), {"_emulator": self})

    # counts
    @property
    def graphs_created(self) -> int:
        return len(self.graphs)

    @property
    def captures_started(self) -> int:
        return len(self.captures)

    @property
    def captures_succeeded(self) -> int:
        return sum(c.status == "succeeded" for c in self.captures)

    @property
    def captures_failed(self) -> int:
        return sum(c.status == "failed" for c in self.captures)

    # thread-local state (CUDA's current device and current streams are per thread)
    def capturing(self) -> _Capture | None:
        """The capture in progress on this thread, if any."""
        return getattr(self._local, "capture", None)

    def _device_stack(self) -> list:
        if not hasattr(self._local, "devices"):
            self._local.devices = []
        return self._local.devices

    def _streams(self) -> dict:
        if not hasattr(self._local, "streams"):
            self._local.streams = {}
        return self._local.streams

    def _as_device(self, device) -> torch.device:
        if device is None:
            return self.current_device()
        if isinstance(device, int):
            return torch.device("cuda", device)
        return torch.device(device)

    def current_device(self) -> torch.device:
        stack = self._device_stack()
        return stack[-1] if stack else self.default_device

    def _new_pool_handle(self):
        return (next(self._pools), 0)

    # generators and pools across captures (module docstring, point 6)
    @staticmethod
    def _with_default(generators) -> list[torch.Generator]:
        return [*generators, torch.default_generator]

    def _enter_generator_capture(self, generators) -> None:
        for g in self._with_default(generators):
            self.generators_in_capture[g._cdata] = g

    def _exit_generator_capture(self, generators) -> None:
        for g in self._with_default(generators):
            self.generators_in_capture.pop(g._cdata, None)
        if not self.generators_in_capture and self._guard is not None:
            current = torch.utils._python_dispatch._get_current_dispatch_mode()
            if current is not self._guard:
                raise RuntimeError("the emulation's generator guard is not the innermost mode")
            guard, self._guard = self._guard, None
            guard.__exit__(None, None, None)

    def _capture_failed(self) -> None:
        if self.generators_in_capture and self._guard is None:
            self._guard = _GeneratorsInCaptureGuard(self)
            self._guard.__enter__()

    def close(self) -> None:
        """Leave the generator guard a failed capture entered (the test's teardown)."""
        self.generators_in_capture.clear()
        self._exit_generator_capture(())

    @property
    def leaked_pools(self) -> set:
        """Pools of failed captures that were never ended and released."""
        return self.pools_allocating - {c.pool for c in self.captures if c.status == "capturing"}

    def end_allocate_to_pool(self, device_index: int, pool) -> None:
        """``torch._C._cuda_endAllocateToPool``: refuses a pool no capture is allocating to."""
        if pool not in self.pools_allocating:
            raise RuntimeError(
                f"endAllocatePool: not currently recording to mempool_id {pool}"
                " [cuda_graph_emulation]"
            )
        self.pools_allocating.discard(pool)
        self.events.append(("end_allocate_to_pool", device_index, pool))

    def release_pool(self, device_index: int, pool) -> None:
        """``torch._C._cuda_releasePool``."""
        if pool in self.pools_allocating:
            raise RuntimeError(f"releasePool: {pool} is still allocating [cuda_graph_emulation]")
        self.pools_released.append(pool)
        self.events.append(("release_pool", device_index, pool))

    def _host_sync(self, what: str, stream: EmulatedStream | None = None) -> None:
        cap = self.capturing()
        if cap is not None:
            mode = cap.info.capture_error_mode
            if mode != "relaxed" or stream is cap.info.stream:
                raise cap.violation(_not_permitted(what))
        elif self._global_captures:
            raise _not_permitted(f"{what} on another thread, capture_error_mode='global'")

    # the torch.cuda API (Stream, CUDAGraph and graph are classes: see __init__)

    def current_stream(self, device=None) -> EmulatedStream:
        device = self._as_device(device)
        stream = self._streams().get(device)
        if stream is None:
            stream = self.default_streams.get(device)
            if stream is None:
                stream = self.default_streams[device] = self.Stream._default_stream(device)
        return stream

    def stream(self, stream: EmulatedStream | None) -> _StreamContext:
        return _StreamContext(self, stream)

    def clear_cublas_workspaces(self) -> None:
        """``torch._C._cuda_clearCublasWorkspaces`` (absent from CPU builds; the emulation has
        no cuBLAS, so the call is only recorded in ``events``)."""
        self.events.append(("clear_cublas_workspaces",))

    def set_stream(self, stream: EmulatedStream) -> None:
        """``torch.cuda.set_stream``: make ``stream`` current on its device (this thread)."""
        self._streams()[stream.device] = stream

    def device(self, device) -> _DeviceContext:
        return _DeviceContext(self, device)

    def synchronize(self, device=None) -> None:
        self.synchronizes.append(None if device is None else self._as_device(device))
        self.events.append(("synchronize", device))
        self._host_sync("torch.cuda.synchronize")

    def graph_pool_handle(self):
        return self._new_pool_handle()

    def is_current_stream_capturing(self) -> bool:
        return self.capturing() is not None

    def _default_capture_stream(self) -> EmulatedStream:
        device = self.current_device()
        if device not in self._capture_streams:
            self._capture_streams[device] = self.Stream(device)
        return self._capture_streams[device]


class EmulatedGraphContext:
    """``torch.cuda.graph``: synchronize, switch to the capture stream, capture."""

    _emulator: Emulator  # set on the class ``install`` makes

    def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode: str = "global"):
        emulator = self._emulator
        self.cuda_graph = cuda_graph
        self.pool = pool
        self.capture_error_mode = capture_error_mode
        self.stream_ctx = _StreamContext(emulator, stream or emulator._default_capture_stream())

    def __enter__(self):
        self._emulator.synchronize()
        self.stream_ctx.__enter__()
        try:
            self.cuda_graph.capture_begin(self.pool, capture_error_mode=self.capture_error_mode)
        except BaseException:
            self.stream_ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        # As torch.cuda.graph: when capture_end raises, the capture stream stays current.
        self.cuda_graph.capture_end(exc)
        self.stream_ctx.__exit__(exc_type, exc, tb)
        return False


def _patched_tolist(emulator: Emulator, original):
    def tolist(self):
        cap = emulator.capturing()
        if cap is not None:
            raise cap.violation(_not_permitted("Tensor.tolist() reads tensor data on the host"))
        return original(self)

    return tolist


def _patched_str(emulator: Emulator, original):
    def _str(self, *args, **kwargs):
        cap = emulator.capturing()
        if cap is not None:
            raise cap.violation(_not_permitted("printing a tensor reads its data on the host"))
        return original(self, *args, **kwargs)

    return _str


def install(monkeypatch, *, default_device="cpu", poison_pool: bool = True) -> Emulator:
    """Replace torch.cuda's graph, stream and device API by the CPU emulation, for the test
    (``monkeypatch`` undoes it; the fixtures call ``Emulator.close()`` at teardown).
    ``default_device``: the current device outside any
    ``torch.cuda.device`` block; ``poison_pool``: fill what a capture allocated with garbage."""
    emu = Emulator(default_device, poison_pool)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", emu.CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", emu.graph)
    monkeypatch.setattr(torch.cuda, "Stream", emu.Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", emu.current_stream)
    monkeypatch.setattr(torch.cuda, "set_stream", emu.set_stream)
    monkeypatch.setattr(torch.cuda, "stream", emu.stream)
    monkeypatch.setattr(torch.cuda, "device", emu.device)
    monkeypatch.setattr(torch.cuda, "synchronize", emu.synchronize)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", emu.graph_pool_handle)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", emu.is_current_stream_capturing)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", emu.end_allocate_to_pool)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", emu.release_pool)
    monkeypatch.setattr(
        torch._C, "_cuda_clearCublasWorkspaces", emu.clear_cublas_workspaces, raising=False
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: emu.current_device().index or 0)
    monkeypatch.setattr(torch.Tensor, "tolist", _patched_tolist(emu, torch.Tensor.tolist))
    monkeypatch.setattr(torch._tensor_str, "_str", _patched_str(emu, torch._tensor_str._str))
    return emu
