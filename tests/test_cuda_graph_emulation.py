"""The CPU emulation of torch.cuda's CUDA-graph API (tests/cuda_graph_emulation.py).

Each semantic a real GPU enforces is checked here: capture records without computing, replay
re-executes the record (N replays == N eager steps, bitwise), host reads / unregistered
generators / device copies raise during capture, the pool lives with the graph, the graph's
life cycle, inference_mode and autograd.
"""

import contextlib
import functools
import os
import re
import threading
import types
import weakref

import cuda_graph_emulation
import pytest
import torch
from cuda_graph_emulation import NOT_PERMITTED


@contextlib.contextmanager
def capture_fails(match: str):
    """The capture fails as on a GPU: ending it raises "operation failed due to a previous
    error during capture" (torch's capture_end), whose __context__ is the illegal call's own
    error, matching ``match``."""
    with pytest.raises(RuntimeError, match="previous error during capture") as info:
        yield info
    root = info.value.__context__
    assert root is not None and re.search(match, str(root)), repr(root)


DEV = torch.device("cpu")
interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (no GPU)"
)


@pytest.fixture
def emu(monkeypatch):
    emulator = cuda_graph_emulation.install(monkeypatch)
    yield emulator
    emulator.close()


def capture(step, *, generators=(), **graph_kwargs):
    """(graph, what step returned) for step captured on a side stream."""
    g = torch.cuda.CUDAGraph()
    for gen in generators:
        g.register_generator_state(gen)
    graph_kwargs.setdefault("stream", torch.cuda.Stream(DEV))
    with torch.cuda.graph(g, **graph_kwargs):
        out = step()
    return g, out


# -- custom ops used below ----------------------------------------------------------------------


@torch.library.custom_op("cge_test::add_into", mutates_args=("out",))
def _add_into(x: torch.Tensor, out: torch.Tensor) -> None:
    out.add_(x)


@torch.library.custom_op("cge_test::sneaky_add", mutates_args=())
def _sneaky_add(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    out.add_(x)  # writes an argument it does not declare
    return x * 2


@torch.library.custom_op("cge_test::host_read", mutates_args=())
def _host_read(x: torch.Tensor) -> torch.Tensor:
    return x * float(x.sum())


@functools.cache
def _triton_scale_op():
    """A custom op launching a Triton kernel that reads a device scalar (x * s)."""
    import triton
    import triton.language as tl

    @triton.jit
    def scale_kernel(x_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, x * tl.load(s_ptr), mask=mask)

    @torch.library.custom_op("cge_test::triton_scale", mutates_args=())
    def triton_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        scale_kernel[(1,)](x, s, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
        return out

    return triton_scale


# -- 1. capture records, it does not compute ----------------------------------------------------


def test_capture_records_ops_and_restores_what_it_wrote(emu):
    a = torch.arange(4.0)
    b = torch.zeros(2, 3)
    xs = [torch.ones(2), torch.ones(3)]
    acc, sneaky = torch.zeros(2), torch.zeros(2)
    w = torch.ones(2, requires_grad=True)
    w.grad = torch.full((2,), 10.0)
    gen = torch.Generator().manual_seed(3)
    gen_state, rng_state = gen.get_state(), torch.get_rng_state()

    def step():
        a.add_(1)
        b[0].fill_(5)  # a write through a view made during the capture
        torch._foreach_mul_(xs, 3.0)  # a Tensor(a!)[] argument
        torch.ops.cge_test.add_into(a[:2], acc)  # a custom op's declared write
        doubled = torch.ops.cge_test.sneaky_add(a[:2], sneaky)  # and an undeclared one
        (w * a[:2]).sum().backward()  # accumulates into the pre-capture w.grad
        r = torch.randn(2, generator=gen) + torch.rand(2)
        return a * 2, doubled, r

    g, (a2, doubled, r) = capture(step, generators=[gen])

    assert torch.equal(a, torch.arange(4.0))
    assert torch.equal(b, torch.zeros(2, 3))
    assert all(torch.equal(x, torch.ones_like(x)) for x in xs)
    assert torch.equal(acc, torch.zeros(2)) and torch.equal(sneaky, torch.zeros(2))
    assert torch.equal(w.grad, torch.full((2,), 10.0))
    assert torch.equal(gen.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), rng_state)
    # What the capture allocated holds garbage until a replay writes it.
    assert a2.isnan().all() and doubled.isnan().all() and r.isnan().all()
    ops = emu.captures[0].ops
    for name in ["aten.add_.Tensor", "aten._foreach_mul_.Scalar", "cge_test.add_into.default"]:
        assert name in ops
    assert "aten.mul.Tensor" in ops[ops.index("aten.sum.default") :]  # the backward's ops
    assert emu.captures[0].restored >= 7

    g.replay()
    a1 = torch.arange(4.0) + 1
    assert torch.equal(a, a1) and torch.equal(a2, a1 * 2)
    assert torch.equal(b[0], torch.full((3,), 5.0)) and torch.equal(b[1], torch.zeros(3))
    assert all(torch.equal(x, torch.full_like(x, 3.0)) for x in xs)
    assert torch.equal(acc, a1[:2]) and torch.equal(sneaky, a1[:2])
    assert torch.equal(doubled, a1[:2] * 2)
    assert torch.equal(w.grad, 10.0 + a1[:2])
    expected_gen = torch.Generator()
    expected_gen.set_state(gen_state)
    torch.set_rng_state(rng_state)
    assert torch.equal(r, torch.randn(2, generator=expected_gen) + torch.rand(2))


# -- 2. replay re-executes the record, not the Python -------------------------------------------


def _make_run(seed: int = 0):
    """A small training step: generator-drawn batch indices and noise, dropout, backward, fused
    capturable AdamW with a device lr computed in the step, in-place counter and loss log."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Dropout(0.25), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )
    lr = torch.tensor(0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)
    gen = torch.Generator().manual_seed(seed + 1)
    run = types.SimpleNamespace(
        model=model,
        opt=opt,
        gen=gen,
        data=torch.randn(10, 3, generator=gen),
        k=torch.zeros((), dtype=torch.int64),
        losses=torch.zeros(8),
        cfg={"noise": 0.1},
    )

    def step():
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(0, 10, (4,), generator=gen)
        x = run.data[idx] + run.cfg["noise"] * torch.randn(4, 3, generator=gen)
        loss = model(x).square().mean()
        loss.backward()
        lr.copy_(0.01 / (1 + run.k))
        opt.step()
        run.losses.index_copy_(0, run.k.reshape(1), loss.detach().reshape(1))
        run.k.add_(1)

    run.step = step
    torch.manual_seed(seed + 2)
    step()  # warm-up: the optimizer's state exists before the capture, as in production
    return run


def _state(run) -> list[torch.Tensor]:
    tensors = [run.k, run.losses, run.gen.get_state()]
    for p in run.model.parameters():
        tensors += [p, p.grad, *run.opt.state[p].values()]
    return tensors


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def _replayed(n: int, noise_after_capture: float | None = None):
    run = _make_run()
    torch.manual_seed(5)
    g, _ = capture(run.step, generators=[run.gen], capture_error_mode="thread_local")
    if noise_after_capture is not None:
        run.cfg["noise"] = noise_after_capture
    versions = (run.k._version, run.losses._version)
    for _ in range(n):
        g.replay()
    assert (run.k._version, run.losses._version) == versions  # a replay bumps none, as on a GPU
    return run, torch.get_rng_state()


def _eager(n: int, noise: float = 0.1):
    run = _make_run()
    run.cfg["noise"] = noise
    torch.manual_seed(5)
    for _ in range(n):
        run.step()
    return run, torch.get_rng_state()


def test_replays_equal_eager_steps_bitwise(emu):
    graphed, graphed_rng = _replayed(3)
    eager, eager_rng = _eager(3)
    assert int(graphed.k) == 4 and not graphed.losses[:4].isnan().any()
    _assert_same(_state(graphed), _state(eager))
    assert torch.equal(graphed_rng, eager_rng)  # dropout drew from the default generator
    assert emu.replays == 3 and emu.graphs[0].replays == 3


def test_python_value_read_at_capture_stays_frozen(emu):
    graphed, _ = _replayed(2, noise_after_capture=1.0)  # the replays keep 0.1
    _assert_same(_state(graphed), _state(_eager(2, noise=0.1)[0]))
    changed = _state(_eager(2, noise=1.0)[0])  # the eager loop re-reads the new value
    assert not torch.equal(graphed.losses, changed[1])


def test_replay_of_a_result_with_another_shape_raises(emu):
    x = torch.ones(2, 3)
    g, s = capture(lambda: x.sum(0))
    g.replay()
    assert torch.equal(s, torch.full((3,), 2.0))
    x.set_(torch.ones(4, 5))
    with pytest.raises(RuntimeError, match="capture recorded"):
        g.replay()


# -- 3. host reads raise during capture ---------------------------------------------------------

HOST_READS = {
    "item": (lambda t: t.sum().item(), "aten._local_scalar_dense"),
    "int": (lambda t: int(t[0]), "aten._local_scalar_dense"),
    "float": (lambda t: float(t.sum()), "aten._local_scalar_dense"),
    "bool": (lambda t: bool(t[0] > 0), "aten._local_scalar_dense"),
    "if": (lambda t: 1 if t.sum() > 0 else 0, "aten._local_scalar_dense"),
    "tolist": (lambda t: t.tolist(), "Tensor.tolist"),
    "str": (lambda t: str(t), "printing a tensor"),
    "equal": (lambda t: torch.equal(t, t), "aten.equal"),
    "nonzero": (lambda t: torch.nonzero(t), "aten.nonzero"),
    "mask": (lambda t: t[t > 1], "aten.index.Tensor with a boolean mask"),
    "synchronize": (lambda t: torch.cuda.synchronize(), "torch.cuda.synchronize"),
    "stream": (lambda t: torch.cuda.current_stream().synchronize(), "Stream.synchronize"),
    "custom_op": (
        lambda t: torch.ops.cge_test.host_read(t),
        "aten._local_scalar_dense.default inside custom op cge_test.host_read",
    ),
}


@pytest.mark.parametrize("name", HOST_READS)
def test_host_read_during_capture_raises(emu, name):
    read, what = HOST_READS[name]
    t = torch.arange(1.0, 4.0)
    written = torch.zeros(3)

    def step():
        written.add_(t)
        return read(t)

    g = torch.cuda.CUDAGraph()
    with capture_fails(NOT_PERMITTED) as info:
        with torch.cuda.graph(g, stream=torch.cuda.Stream(DEV)):
            step()
    assert what in str(info.value.__context__)
    assert emu.captures_failed == 1 and emu.captures[0].status == "failed"
    assert torch.equal(written, torch.zeros(3))  # restored on failure too
    with pytest.raises(RuntimeError, match="without a preceding successful capture"):
        g.replay()
    read(t)  # outside a capture the same read works


def test_host_read_caught_by_python_still_fails_the_capture(emu):
    t = torch.ones(2)

    def step():
        try:
            t.sum().item()
        except RuntimeError:
            pass
        return t + 1

    with pytest.raises(RuntimeError, match="previous error during capture"):
        capture(step)
    assert emu.captures_failed == 1


def test_host_read_under_inference_mode_raises(emu):
    with torch.inference_mode():
        t = torch.ones(2)
        with capture_fails(NOT_PERMITTED):
            capture(lambda: t.sum().item())


def test_capture_error_modes_and_synchronize(emu):
    side = torch.cuda.Stream(DEV)
    g, _ = capture(torch.cuda.synchronize, stream=side, capture_error_mode="relaxed")
    assert emu.captures[0].capture_error_mode == "relaxed"
    with capture_fails("Stream.synchronize"):
        capture(side.synchronize, stream=side, capture_error_mode="relaxed")

    errors = []

    def other_thread():
        try:
            torch.cuda.synchronize()
        except RuntimeError as e:
            errors.append(e)

    for mode, expected in [("thread_local", 0), ("global", 1)]:
        errors.clear()

        def step():
            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()

        capture(step, capture_error_mode=mode)
        assert len(errors) == expected
    assert [c.capture_error_mode for c in emu.captures] == [
        "relaxed",
        "relaxed",
        "thread_local",
        "global",
    ]


@interpreter_only
def test_custom_op_launching_a_triton_kernel_is_captured_and_replayed(emu):
    scale = _triton_scale_op()
    x, s = torch.arange(5.0), torch.tensor(2.0)
    g, y = capture(lambda: scale(x, s) + 1)
    assert emu.captures[0].ops == ["cge_test.triton_scale.default", "aten.add.Tensor"]
    assert y.isnan().all()
    g.replay()
    assert torch.equal(y, x * 2 + 1)
    x.copy_(torch.arange(5.0) * 10)
    s.fill_(3.0)
    g.replay()  # the kernel runs again on the new values: the interpreter keeps working
    assert torch.equal(y, x * 3 + 1)


@interpreter_only
def test_fastdiff_q_sample_is_one_recorded_op(emu):
    from fastdiff.schedule import NoiseSchedule

    sched = NoiseSchedule.linear(10)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    sqrt_ac = sched.sqrt_alphas_cumprod.float()
    sqrt_1m = sched.sqrt_one_minus_alphas_cumprod.float()
    seed = torch.tensor([11], dtype=torch.int64)
    g, z = capture(lambda: torch.ops.fastdiff.q_sample(x, t, sqrt_ac, sqrt_1m, None, seed))
    assert emu.captures[0].ops == ["fastdiff.q_sample.default"]
    for s in (11, 12):
        seed.fill_(s)
        g.replay()
        assert torch.equal(z, torch.ops.fastdiff.q_sample(x, t, sqrt_ac, sqrt_1m, None, seed))


# -- 4. generators ------------------------------------------------------------------------------


def test_unregistered_generator_raises(emu):
    gen = torch.Generator().manual_seed(0)
    with capture_fails("not registered with the graph"):
        capture(lambda: torch.randn(2, generator=gen))
    assert emu.captures_failed == 1


def test_a_failed_capture_leaves_its_generators_in_capture_mode(emu):
    """As torch 2.4-2.12: after a failed capture, eager draws from its generators (registered
    or the default one, given or implied) and replays of graphs using them raise, until a
    capture with them succeeds; other generators draw as before."""
    gen, other = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    good, _ = capture(lambda: torch.ones(1) + 1)
    with pytest.raises(RuntimeError):
        capture(lambda: torch.randn(2, generator=gen).sum().item(), generators=[gen])
    outside = "Offset increment outside graph capture"
    for draw in (
        lambda: torch.randn(2, generator=gen),
        lambda: torch.randn(2),
        lambda: torch.nn.functional.dropout(torch.ones(4), 0.5),
        lambda: torch.randint(0, 5, (2,), generator=torch.default_generator),
    ):
        with pytest.raises(RuntimeError, match=outside):
            draw()
    with pytest.raises(RuntimeError, match=outside):
        good.replay()
    torch.randn(2, generator=other)  # not in the failed capture
    capture(lambda: torch.zeros(1), generators=[gen])  # a capture that succeeds
    assert not emu.generators_in_capture
    torch.randn(2, generator=gen), torch.randn(2)
    good.replay()


def test_a_failed_capture_keeps_its_pool_until_ended_and_released(emu):
    pool = torch.cuda.graph_pool_handle()
    with pytest.raises(RuntimeError):
        capture(lambda: torch.ones(2).sum().item(), pool=pool)
    assert emu.leaked_pools == {pool}
    with pytest.raises(RuntimeError, match="still allocating"):
        torch._C._cuda_releasePool(0, pool)
    torch._C._cuda_endAllocateToPool(0, pool)
    torch._C._cuda_releasePool(0, pool)
    assert not emu.leaked_pools and emu.pools_released == [pool]
    with pytest.raises(RuntimeError, match="not currently recording"):
        torch._C._cuda_endAllocateToPool(0, pool)
    graph, _ = capture(lambda: torch.ones(1) + 1)
    assert not emu.leaked_pools  # a capture that succeeds ends its pool's allocation


def test_registered_and_default_generators_are_allowed(emu):
    gen, late = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    late_state = late.get_state()

    def step():
        g.register_generator_state(late)  # registered during the capture
        return (
            torch.randn(2, generator=gen)
            + torch.randn(2, generator=torch.default_generator)
            + torch.rand(2, generator=late)
        )

    g = torch.cuda.CUDAGraph()
    g.register_generator_state(gen)
    with torch.cuda.graph(g, stream=torch.cuda.Stream(DEV)):
        step()
    assert emu.captures_succeeded == 1 and emu.graphs[0].generators == 2
    assert torch.equal(late.get_state(), late_state)


# -- 5. device copies, pinned memory, the pool --------------------------------------------------

DEVICE_COPIES = {
    "to": (lambda t: t.to("meta"), "copies between devices"),
    "copy_": (lambda t: t.copy_(torch.empty(3, device="meta")), "copies between devices"),
    "pinned": (lambda t: torch.empty(3, pin_memory=True), "pinned host memory"),
}


@pytest.mark.parametrize("name", DEVICE_COPIES)
def test_device_copy_or_pinned_memory_during_capture_raises(emu, name):
    op, what = DEVICE_COPIES[name]
    t = torch.ones(3)
    with capture_fails(what):
        capture(lambda: op(t))
    assert emu.captures_failed == 1


def test_pool_lives_with_the_graph(emu):
    # No gc.collect(): reference counting alone frees the pool (no reference cycles).
    x = torch.ones(3)
    g, y = capture(lambda: x * 2)
    ref = weakref.ref(y)
    del y
    assert ref() is not None  # the graph keeps its pool
    g.reset()
    assert ref() is None

    g2, y2 = capture(lambda: x * 3)
    ref2 = weakref.ref(y2)
    del y2
    assert ref2() is not None and emu.graphs[1].alive
    del g2
    assert ref2() is None and not emu.graphs[1].alive


# -- 6. the graph's life cycle ------------------------------------------------------------------


def test_graph_life_cycle(emu):
    side = torch.cuda.Stream(DEV)
    x = torch.ones(2)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="without a preceding successful capture"):
        g.replay()
    with torch.cuda.graph(g, stream=side):
        y = x + 1
    with pytest.raises(RuntimeError, match="already owns a captured graph"):
        with torch.cuda.graph(g, stream=side):
            pass
    g.reset()
    with pytest.raises(RuntimeError, match="without a preceding successful capture"):
        g.replay()
    with torch.cuda.graph(g, stream=side):  # after reset() the graph can capture again
        y = x + 2
    g.replay()
    assert torch.equal(y, torch.full((2,), 3.0))

    raised = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError):
        with torch.cuda.graph(raised, stream=side):
            raise ValueError("a Python error inside the capture")
    # No illegal call: CUDA ends the capture normally, torch keeps the (here empty) graph and
    # restores the stream.
    raised.replay()
    assert torch.cuda.current_stream(DEV) is not side
    assert [c.status for c in emu.captures] == ["succeeded", "succeeded", "raised"]

    with pytest.raises(RuntimeError, match="non-default stream"):
        torch.cuda.CUDAGraph().capture_begin()  # the current stream is the default stream
    # A capture inside a capture: torch.cuda.graph synchronizes first, which fails the outer
    # capture as on a GPU; capture_begin alone refuses too.
    with pytest.raises(RuntimeError, match="previous error during capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side):
            with pytest.raises(RuntimeError, match=NOT_PERMITTED):
                with torch.cuda.graph(torch.cuda.CUDAGraph()):
                    pass
    with pytest.raises(RuntimeError, match="previous error during capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side):
            with pytest.raises(RuntimeError, match="another capture"):
                torch.cuda.CUDAGraph().capture_begin()
    assert [c.status for c in emu.captures[-2:]] == ["failed", "failed"]


def test_emulator_records_the_production_pattern(emu):
    assert hasattr(torch.cuda.CUDAGraph, "register_generator_state")
    side = torch.cuda.Stream(device=DEV)
    side.wait_stream(torch.cuda.current_stream(DEV))
    x = torch.zeros(3)
    with torch.cuda.stream(side):
        x.add_(1)  # a warm-up step runs eagerly
        assert torch.cuda.current_stream(DEV) is side
    torch.cuda.current_stream(DEV).wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    with torch.cuda.device(DEV):
        g = torch.cuda.CUDAGraph()
        gen = torch.Generator()
        g.register_generator_state(gen)
        assert not torch.cuda.is_current_stream_capturing()
        with torch.cuda.graph(g, pool=pool, stream=side, capture_error_mode="thread_local"):
            assert torch.cuda.current_stream() is side
            assert torch.cuda.is_current_stream_capturing()
            x.add_(torch.rand(3, generator=gen))
        for _ in range(4):
            g.replay()
    assert emu.graphs_created == 1 and emu.graphs[0].generators == 1
    assert (emu.captures_started, emu.captures_succeeded, emu.captures_failed) == (1, 1, 0)
    assert emu.replays == 4 and g.replay_count == 4
    assert emu.streams == [side] and side.device == DEV
    c = emu.captures[0]
    assert c.stream is side and c.device == DEV and c.pool == pool
    assert c.capture_error_mode == "thread_local"
    assert c.ops[0] == "aten.rand.generator" and c.ops[-1] == "aten.add_.Tensor"
    assert emu.device_events == [("enter", DEV), ("exit", DEV)]
    assert side.waited_on == [emu.default_streams[DEV]]
    assert emu.synchronizes == [None]  # torch.cuda.graph synchronizes before capturing

    # Without stream=, torch.cuda.graph captures on a side stream of its own, made once.
    for _ in range(2):
        capture(lambda: x * 2, stream=None)
    s1, s2 = emu.captures[1].stream, emu.captures[2].stream
    assert s1 is s2 and not s1.is_default and s1 in emu.streams


# -- 7. inference_mode, autocast ----------------------------------------------------------------


def test_capture_under_inference_mode(emu):
    lin = torch.nn.Linear(3, 2)
    with torch.inference_mode():
        x = torch.randn(3, 4)
        total = torch.zeros(8)

        def step():
            flat = lin(x.t()).t().reshape(-1)  # reshape copies: composite, decomposed
            total.add_(flat)
            return flat * 2

        g, doubled = capture(step)
        assert torch.equal(total, torch.zeros(8))
    g.replay()  # outside inference_mode: writes to inference tensors as a GPU would
    x_new = torch.randn(3, 4)
    with torch.inference_mode():
        x.copy_(x_new)
    g.replay()
    with torch.inference_mode():
        flat0 = lin(x.t()).t().reshape(-1)
    assert torch.equal(doubled, flat0 * 2)
    assert "aten.clone.default" in emu.captures[0].ops


def test_replay_is_not_autocast_again(emu):
    """A replay runs the recorded (already cast) ops, whatever autocast state it runs in."""
    a = torch.randn(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g16, y16 = capture(lambda: a @ a)  # recorded: the casts to bf16, then a bf16 mm
    g32, y32 = capture(lambda: a @ a)  # recorded: an fp32 mm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g32.replay()
    g16.replay()
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, a.bfloat16() @ a.bfloat16())
    assert y32.dtype == torch.float32 and torch.equal(y32, a @ a)
