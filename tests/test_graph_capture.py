"""Captured training and sampling steps, run through the CPU emulation of CUDA graphs
(tests/cuda_graph_emulation.py: capture records the step's ops without their effects, replay
re-runs the record without the step's Python, host reads during capture raise).

What is checked: N steps with capture and replays equal N eager steps bitwise; inputs are
prepared before each replay; re-capture after a restore; no capture on a run's last step;
a step that cannot be captured (a model reading a tensor on the host, the torch reference
backend) continues eagerly from the same state with one log line, or raises in strict mode;
the graph, its pool and the optimizer state are released when ``train()`` returns; an
optimizer state from an eager or CPU run is moved where the fused kernel reads it.
"""

import copy
import gc
import logging
import shutil
import weakref

import pytest
import torch
from test_train_graph import make_run, max_diff, state_equal
from test_training import TINY, tiny_data
from torch import nn
from torch.utils.data import TensorDataset

import fastdiff
from fastdiff import cuda_graphs, ops, train_graph, training
from fastdiff.kernels import reference as ref
from fastdiff.precision import resolve_precision
from fastdiff.sampling import Sampler, StepBuffers, run_sampler

pytest.importorskip("triton")

CPU = torch.device("cpu")
#: The smallest sample grid a run with out_dir writes (its sampler is graphed too).
GRID = dict(n_samples=1, sample_sampler="ddim", sample_steps=2)
#: fp32 contiguous: CPU auto may pick channels_last, whose GroupNorm+SiLU would run in the
#: (slow) Triton interpreter too.
TINY = {**TINY, "precision": "fp32", "channels_last": False}
FP32 = resolve_precision("fp32", CPU)


class HostReadingModel(nn.Module):
    """A user model that reads a tensor on the host in forward (``.item()``): it trains
    eagerly, but a CUDA graph cannot capture it."""

    def __init__(self):
        super().__init__()
        self.inner = training.model_for_data((1, 8, 8), "tiny")

    def forward(self, z, t):
        scale = 1.0 + 0.0 * float(z.abs().amax().item())
        return self.inner(z, t) * scale


def _graph_steps(run, n):
    for _ in range(n):
        run.train_step()
    return run


# -- the training step ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["in_memory", "streamed"])
def test_replayed_training_equals_the_eager_step_bitwise(emulated_cuda, source):
    """3 warm-up steps, a capture, 4 replays == 7 eager runs of the same step function: same
    batches across epoch boundaries (5 images, batch 2: each replay's input is prepared
    before it), t, noise, lr, AdamW state and EMA, bit for bit."""
    data = tiny_data(n=5)
    if source == "streamed":
        data = TensorDataset(data)
    replayed = _graph_steps(make_run(data, graph=True, batch_size=2), 7)
    assert replayed.graph_step.graph is not None
    assert emulated_cuda.captures == 1 and emulated_cuda.replays == 4
    emulated_cuda.disable()  # the same step function, eagerly
    eager = _graph_steps(make_run(data, graph=True, batch_size=2), 7)
    assert eager.graph_step.graph is None
    assert max_diff(replayed.model, eager.model) == 0
    assert max_diff(replayed.ema.shadow, eager.ema.shadow) == 0
    assert torch.equal(replayed.losses, eager.losses)
    assert torch.equal(replayed.t_gen.get_state(), eager.t_gen.get_state())
    assert state_equal(replayed.batches.state_dict(), eager.batches.state_dict())
    assert state_equal(replayed.optimizer.state_dict(), eager.optimizer.state_dict())
    assert int(replayed.graph_step.counter) == replayed.step == 7


@pytest.mark.parametrize("steps", [train_graph.WARMUP_STEPS, train_graph.WARMUP_STEPS + 1])
def test_no_capture_for_a_run_that_ends_with_the_warm_up(emulated_cuda, steps):
    fastdiff.train(tiny_data(n=4), steps=steps, batch_size=2, **TINY)
    assert emulated_cuda.captures == (steps > train_graph.WARMUP_STEPS)


def test_restore_recaptures_and_resume_is_exact(emulated_cuda, tmp_path):
    """A checkpoint restored into a run replaces the optimizer state: the step warms up and
    captures again, and 4 + resume to 8 == 8 straight, bitwise."""
    kw = dict(batch_size=2, log_every=2, checkpoint_every=4, lr=1e-3, **TINY, **GRID)
    data = tiny_data(n=6)
    straight = fastdiff.train(data, steps=8, out_dir=tmp_path / "a", **kw)
    assert emulated_cuda.train_captures == 1
    fastdiff.train(data, steps=4, out_dir=tmp_path / "b", **kw)
    resumed = fastdiff.train(data, steps=8, out_dir=tmp_path / "b", resume=True, **kw)
    assert emulated_cuda.train_captures == 3  # straight, the first part, the resumed part
    assert max_diff(straight.model, resumed.model) == 0
    assert max_diff(straight.ema_model, resumed.ema_model) == 0


def test_a_resume_that_changes_the_batch_source_captures_the_checkpoints(
    emulated_cuda, tmp_path, monkeypatch
):
    """A run saved with in-memory batches, resumed where its data would be streamed (less
    free device memory): the captured step gathers from the checkpoint's kind again, and
    4 + resume to 8 == 8 straight, bitwise."""
    kw = dict(batch_size=2, log_every=2, checkpoint_every=4, lr=1e-3, **TINY, **GRID)
    data = tiny_data(n=6)
    straight = fastdiff.train(data, steps=8, out_dir=tmp_path / "a", **kw)
    fastdiff.train(data, steps=4, out_dir=tmp_path / "b", **kw)
    fits = training.make_batches
    monkeypatch.setattr(training, "make_batches",
                        lambda *a, **k: fits(*a, **{"max_device_bytes": 0, **k}))  # fmt: skip
    resumed = fastdiff.train(data, steps=8, out_dir=tmp_path / "b", resume=True, **kw)
    assert emulated_cuda.train_captures == 3
    assert max_diff(straight.model, resumed.model) == 0
    assert max_diff(straight.ema_model, resumed.ema_model) == 0


def test_a_state_loaded_into_a_captured_run_is_bound_and_captured_afresh(emulated_cuda):
    """Loading an optimizer state into a run that has a graph replaces the tensors the graph
    updates: the step binds the new state, warms up and captures again (replaying the old
    graph would update the discarded tensors), and the run equals the same run never
    captured, bitwise."""

    def run_with_a_reload():
        run = _graph_steps(make_run(tiny_data(n=5), graph=True, batch_size=2), 4)
        run.optimizer.load_state_dict(copy.deepcopy(run.optimizer.state_dict()))
        return _graph_steps(run, 4)

    captured = run_with_a_reload()
    assert emulated_cuda.train_captures == 2 and emulated_cuda.replays == 1 + 1
    emulated_cuda.disable()
    eager = run_with_a_reload()
    assert state_equal(captured.optimizer.state_dict(), eager.optimizer.state_dict())
    assert max_diff(captured.model, eager.model) == 0


def test_checkpoints_move_between_eager_and_graph_steps(emulated_cuda, tmp_path):
    """An eager run's checkpoint (non-fused AdamW state) resumes in a captured step and a
    captured run's in the eager step: the same training as a run that never moved, within
    the rounding by which the two step functions differ (lr in fp32, EMA arithmetic)."""
    kw = dict(batch_size=2, log_every=4, checkpoint_every=4, lr=1e-3, **TINY, **GRID)
    kw["precision"] = "fp32"
    data = tiny_data(n=6)
    straight = fastdiff.train(data, steps=8, out_dir=tmp_path / "a", cuda_graph=False, **kw)
    for first in (False, True):
        out = tmp_path / f"from_{'graph' if first else 'eager'}"
        fastdiff.train(data, steps=4, out_dir=out, cuda_graph=first, **kw)
        captures = emulated_cuda.train_captures
        resumed = fastdiff.train(data, steps=8, out_dir=out, resume=True, cuda_graph=not first,
                                 **kw)  # fmt: skip
        assert emulated_cuda.train_captures == captures + (not first)  # the graph run captured
        assert max_diff(straight.model, resumed.model) < 1e-5, first
        assert max_diff(straight.ema_model, resumed.ema_model) < 1e-5, first


def test_bind_moves_the_optimizer_state_where_the_fused_step_reads_it(emulated_cuda):
    """A state loaded from another run keeps its ``step`` where that run had it (a host or
    float64 tensor); binding puts every state tensor on its parameter's device, ``step`` in
    float32 and the moments in the parameter's dtype."""
    run = make_run(tiny_data(n=4), graph=True, batch_size=2)
    eager = torch.optim.AdamW(run.model.parameters(), lr=1e-3)  # not fused, not capturable
    for p in run.model.parameters():
        p.grad = torch.ones_like(p)
    eager.step()
    state = eager.state_dict()
    for s in state["state"].values():
        s["step"] = s["step"].double()
        s["exp_avg"] = s["exp_avg"].double()
    run.optimizer.load_state_dict(state)
    run.optimizer.zero_grad(set_to_none=True)
    run.train_step()
    for p in run.model.parameters():
        st = run.optimizer.state[p]
        assert st["step"].dtype == torch.float32 and st["step"].device == p.device
        assert st["exp_avg"].dtype == p.dtype and st["exp_avg_sq"].dtype == p.dtype
        assert float(st["step"]) == 2.0
    group = run.optimizer.param_groups[0]
    assert group["fused"] and group["capturable"] and group["lr"] is run.graph_step.lr


def test_a_model_that_cannot_be_captured_trains_eagerly_from_the_same_state(emulated_cuda,
                                                                             caplog):  # fmt: skip
    """The capture fails (host read in forward): one log line names the cause, nothing of the
    capture stays (no graph, generators and data where they were), and the run's weights
    after N steps are those of the same run never captured, bitwise."""

    def run_with(model_seed=0):
        torch.manual_seed(model_seed)
        model = HostReadingModel()
        with caplog.at_level(logging.WARNING, logger="fastdiff"):
            return fastdiff.train(tiny_data(n=5), model=model, steps=5, batch_size=2, **TINY)

    failed = run_with()
    messages = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "training step: cuda_graph: the capture failed" in messages[0]
    assert "operation not permitted when stream is capturing" in messages[0]
    assert emulated_cuda.replays == 0
    _assert_capture_closed(emulated_cuda.emulator)
    emulated_cuda.disable()  # the same runs, never captured
    eager = run_with()
    assert max_diff(failed.model, eager.model) == 0
    assert max_diff(failed.ema_model, eager.ema_model) == 0


def _assert_capture_closed(emu):
    """What torch leaves half-open after a failed capture was closed by fastdiff: no
    generator in capture mode (torch <= 2.12 would raise at the next draw or replay), and
    every failed capture's memory pool ended and released."""
    failed = [c.pool for c in emu.captures if c.status == "failed"]
    assert failed and not emu.generators_in_capture
    assert not emu.leaked_pools and set(failed) <= set(emu.pools_released)


class CaptureRefusingModel(nn.Module):
    """Raises a plain Python error while a capture is running (no illegal CUDA call), and
    trains eagerly otherwise."""

    def __init__(self):
        super().__init__()
        self.inner = training.model_for_data((1, 8, 8), "tiny")

    def forward(self, z, t):
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("this model refuses to be captured")
        return self.inner(z, t)


def test_a_python_error_during_capture_falls_back_without_undoing_a_capture_that_ended(
    emulated_cuda, caplog
):
    """A plain Python error ends the capture normally (torch restores the stream and releases
    the generators and the pool with the graph): the fallback then runs eagerly without
    touching the allocator's pool or the generators' capture state, which are no longer its
    to close (closing them would fail and log a false "stays reserved")."""
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        run = fastdiff.train(tiny_data(n=5), model=CaptureRefusingModel(), steps=5, batch_size=2,
                             **TINY)  # fmt: skip
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "ValueError: this model refuses to be captured" in said[0], said
    emu = emulated_cuda.emulator
    assert [c.status for c in emu.captures] == ["raised"]
    assert not emu.generators_in_capture and not emu.leaked_pools
    assert not any(e[0] in ("end_allocate_to_pool", "release_pool") for e in emu.events)
    assert emulated_cuda.replays == 0 and run.model is not None


def test_every_capture_begins_and_ends_with_fresh_cublas_workspaces(emulated_cuda):
    """cuBLAS keeps a workspace per stream; a graph embeds the one its capture stream has.
    Cleared before each capture and after it, every graph allocates its own in its pool, and
    no eager GEMM (nor a later graph) shares it (pytorch#193402: a graph's reset frees its
    stream's workspaces, live graphs' included)."""
    run = _graph_steps(make_run(tiny_data(n=4), graph=True, batch_size=2), train_graph.WARMUP_STEPS)
    sampler = Sampler(run.model.eval(), run.schedule, precision=FP32, channels_last=False,
                      sampler="ddim", steps=3)  # fmt: skip
    with torch.inference_mode():
        run_sampler(sampler, 1, (1, 8, 8), CPU, seed=0, batch_size=1, cuda_graph=True)
    marks = [e[0] for e in emulated_cuda.emulator.events
             if e[0] in ("capture_begin", "capture_end", "clear_cublas_workspaces")]  # fmt: skip
    assert emulated_cuda.captures == 2
    assert marks == ["clear_cublas_workspaces", "capture_begin", "capture_end",
                     "clear_cublas_workspaces"] * 2, marks  # fmt: skip


class HostReadingSamplerModel(nn.Module):
    """Reads a tensor on the host only without grad: the training step captures, the sample
    grid's sampler does not."""

    def __init__(self):
        super().__init__()
        self.inner = training.model_for_data((1, 8, 8), "tiny")

    def forward(self, z, t):
        if not torch.is_grad_enabled():
            z = z * (1.0 + 0.0 * float(z.abs().amax().item()))
        return self.inner(z, t)


def test_a_failed_grid_capture_does_not_stop_the_captured_training(emulated_cuda, tmp_path,
                                                                   caplog):  # fmt: skip
    """The grid's sampler fails to capture in the middle of a captured run: the grid is drawn
    eagerly, and the training graph goes on replaying (torch <= 2.12 would refuse the replay
    while the failed capture left the default generator in capture mode)."""
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        fastdiff.train(tiny_data(n=5), model=HostReadingSamplerModel(), steps=8, batch_size=2,
                       out_dir=tmp_path, sample_every=4, **TINY, **GRID)  # fmt: skip
    said = [r.getMessage() for r in caplog.records]
    assert any("sampling: cuda_graph: the capture failed" in m for m in said), said
    assert emulated_cuda.train_captures >= 1
    grid_failed = next(i for i, c in enumerate(emulated_cuda.capture_log) if c.status == "failed")
    replays_after = [e for e in emulated_cuda.emulator.events[grid_failed:] if e[0] == "replay"]
    assert replays_after and (tmp_path / "samples.png").exists()
    _assert_capture_closed(emulated_cuda.emulator)


class _HostReadInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 + 0.0 * float(grad.abs().amax().item()))


class HostReadingBackwardModel(HostReadingModel):
    """Reads a tensor on the host in its backward, at the input end: the capture fails after
    the parameters' gradients were allocated in the graph's pool."""

    def forward(self, z, t):
        return self.inner(_HostReadInBackward.apply(z.requires_grad_()), t)


def test_a_failed_capture_leaves_no_gradient_from_its_pool(emulated_cuda, monkeypatch):
    """The failed capture's backward allocated the gradients in the dead graph's pool; none of
    them stays on the parameters."""
    import test_train_graph

    monkeypatch.setattr(test_train_graph, "model_for_data", lambda *a: HostReadingBackwardModel())
    run = make_run(tiny_data(n=5), graph=True, batch_size=2)
    _graph_steps(run, train_graph.WARMUP_STEPS)  # the capture follows the last warm-up step
    assert emulated_cuda.emulator.captures_failed == 1
    assert run.graph_step.graph is None and not run.graph_step.capture
    assert all(p.grad is None for p in run.model.parameters())


@pytest.mark.parametrize("failure", ["python error", "host read"])
def test_a_failed_capture_empties_the_cache_once_the_steps_tensors_are_freed(
    emulated_cuda, monkeypatch, failure
):
    """The failed step's tensors live on in the exception's traceback until the except block
    ends; the cache is emptied after that (else their blocks stay reserved on the GPU)."""
    held = []

    def body():
        x = torch.ones(4) * 2  # an activation of the step
        held.append(weakref.ref(x))
        if failure == "python error":
            raise ValueError("refused")
        x.sum().item()  # a host read: illegal in a capture

    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(held[0]() is None))
    assert cuda_graphs.capture(body, device=CPU, what="step", strict=False) is None
    assert freed and freed[-1] is True


def test_strict_mode_refuses_the_fallback(emulated_cuda, monkeypatch):
    kw = dict(model=HostReadingModel(), steps=4, batch_size=2, **TINY)
    with pytest.raises(fastdiff.GraphCaptureError, match="the capture failed"):
        fastdiff.train(tiny_data(n=4), strict=True, **kw)
    monkeypatch.setenv("FASTDIFF_STRICT", "1")
    with pytest.raises(fastdiff.GraphCaptureError, match="the capture failed"):
        fastdiff.train(tiny_data(n=4), **kw)
    monkeypatch.setenv("FASTDIFF_STRICT", "maybe")
    with pytest.raises(ValueError, match="FASTDIFF_STRICT"):
        fastdiff.train(tiny_data(n=4), **kw)


def test_the_reference_backend_is_not_captured(emulated_cuda, monkeypatch, caplog, tmp_path):
    """The reference ops read the seed on the host (illegal in a capture): graphs are not
    attempted (training step and sample grid), one log line each says why, strict mode
    refuses."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        fastdiff.train(tiny_data(n=4), steps=5, batch_size=2, n_samples=1, out_dir=tmp_path,
                       sample_sampler="ddim", sample_steps=2, **TINY)  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert any("training step" in m and "FASTDIFF_BACKEND=reference" in m for m in said), said
    assert any("sampling" in m and "FASTDIFF_BACKEND=reference" in m for m in said), said
    assert emulated_cuda.captures == 0
    with pytest.raises(fastdiff.GraphCaptureError, match="reads the noise seed on the host"):
        fastdiff.train(tiny_data(n=4), steps=5, batch_size=2, strict=True, **TINY)


def test_the_graph_and_the_optimizer_state_go_when_train_returns(emulated_cuda, monkeypatch):
    """No reference cycle keeps the run (and with it the graph, its pool, the optimizer
    state) alive after train() returns: they are freed by reference counting alone."""
    runs = []
    real_loop = training._Run.loop

    def loop(self, *args, **kwargs):
        runs.append(weakref.ref(self))
        return real_loop(self, *args, **kwargs)

    monkeypatch.setattr(training._Run, "loop", loop)
    graphs = []
    real_capture = train_graph.GraphStep._capture

    def capture(self):
        real_capture(self)
        graphs.append((weakref.ref(self.graph), weakref.ref(self), weakref.ref(self.run.optimizer)))

    monkeypatch.setattr(train_graph.GraphStep, "_capture", capture)
    gc.collect()
    gc.disable()
    try:
        fastdiff.train(tiny_data(n=4), steps=5, batch_size=2, **TINY)
        assert len(graphs) == 1 and len(runs) == 1
        assert runs[0]() is None
        assert all(ref() is None for ref in graphs[0])
    finally:
        gc.enable()


def test_captures_use_a_stream_of_their_device_in_thread_local_mode(emulated_cuda):
    run = _graph_steps(make_run(tiny_data(n=4), graph=True, batch_size=2), train_graph.WARMUP_STEPS)
    assert run.graph_step.graph is not None
    sampler = Sampler(run.model.eval(), run.schedule, precision=FP32, channels_last=False,
                      sampler="ddim", steps=3)  # fmt: skip
    with torch.inference_mode():
        run_sampler(sampler, 1, (1, 8, 8), CPU, seed=0, batch_size=1, cuda_graph=True)
    assert emulated_cuda.captures == 2
    for capture in emulated_cuda.capture_log:
        assert capture.capture_error_mode == "thread_local"
        assert capture.stream is not None and capture.stream.device == CPU


# -- the sampler ----------------------------------------------------------------------------------


def _sampler(model=None, kind="ddpm", steps=None, T=20):
    schedule = fastdiff.NoiseSchedule.linear(T)
    model = model or training.model_for_data((1, 8, 8), "tiny").eval()
    return Sampler(model, schedule, precision=FP32, channels_last=False, sampler=kind,
                   steps=steps)  # fmt: skip


@pytest.mark.parametrize("kind,steps,T", [("ddpm", None, 5), ("ddim", 3, 20), ("ddpm", None, 2)])
def test_replayed_sampler_equals_the_eager_chain_bitwise(emulated_cuda, kind, steps, T):
    """Capture once, replay per step: the eager chain's images bit for bit, twice (the cached
    graph); the warm-up stays inside the chain (T = 2: three warm-up steps of a 2-step chain
    would read t = -1) and draws nothing from the default generator."""
    sampler = _sampler(kind=kind, steps=steps, T=T)
    z0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = sampler.run_eager(StepBuffers(z0.clone(), sampler.timesteps[0], 5)).clone()
        rng = torch.get_rng_state()
        graph = sampler.run_graph(z0, 5)
        assert torch.equal(torch.get_rng_state(), rng)  # the default generator is untouched
        again = sampler.run_graph(z0, 5)  # the cached graph
    assert emulated_cuda.captures == 1
    assert emulated_cuda.replays == 2 * sampler.num_steps
    assert torch.equal(graph, eager) and torch.equal(again, eager)


class ZeroEps(nn.Module):
    """Predicts eps = 0: each DDIM step depends on the latents and the noise only."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, z, t):
        return torch.zeros_like(z)


def test_replayed_ddim_with_eta_draws_fresh_noise_at_every_replay(emulated_cuda):
    """DDIM with eta = 1: the fused step reads its noise seed from the step buffers, so the
    step is captured (no fallback), the runner advances the seed after each replay, and every
    replay draws the Philox noise of its own step seed -- fresh noise per step, the eager
    chain's, bit for bit."""
    schedule = fastdiff.NoiseSchedule.linear(20)
    sampler = Sampler(ZeroEps(), schedule, precision=FP32, channels_last=False, sampler="ddim",
                      steps=3, eta=1.0)  # fmt: skip
    assert sampler.graph_unavailable(CPU) is None
    z0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = []

    def record():  # the graph's static latents after each replay
        latents.append(sampler._graphs[2][1].z.clone())

    with torch.inference_mode():
        eager = sampler.run_eager(StepBuffers(z0.clone(), sampler.timesteps[0], 5)).clone()
        graph = sampler.run_graph(z0, 5, on_step=record)
    assert emulated_cuda.captures == 1 and emulated_cuda.replays == sampler.num_steps == 3
    assert torch.equal(graph, eager)
    steps, previous = sampler.timesteps + [-1], z0
    for k, z in enumerate(latents):  # replay k: the step with the normals of seed 5 + k
        t, t_prev = (torch.full((2,), steps[i]) for i in (k, k + 1))
        normals = [ref.philox_normal(seed, z.shape) for seed in (5 + k, 5)]
        with_seed = [ops.ddim_step(previous, torch.zeros_like(z), t, t_prev, schedule, n,
                                   eta=1.0) for n in normals]  # fmt: skip
        assert torch.equal(z, with_seed[0]), k
        # seed 5's noise: the first step's own; never the second's; the last adds none
        assert torch.equal(z, with_seed[1]) == (k != 1), k
        previous = z


class HostBranchDenoiser(nn.Module):
    """Reads t on the host to pick a branch: what a real graph would freeze at capture."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, z, t):
        if int(t[0]) > 2:  # a host read: fails the capture
            return z * self.scale
        return z * 0.1


def test_a_sampler_that_cannot_be_captured_runs_eagerly(emulated_cuda, caplog):
    sampler = _sampler(HostBranchDenoiser(), T=5)
    z0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager = sampler.run_eager(StepBuffers(z0.clone(), sampler.timesteps[0], 5)).clone()
        with caplog.at_level(logging.WARNING, logger="fastdiff"):
            fallback = sampler.run_graph(z0, 5)
            again = sampler.run_graph(z0, 5)  # no second attempt, no second line
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "sampling: cuda_graph: the capture failed" in said[0]
    assert sampler.graph_failed and emulated_cuda.replays == 0
    _assert_capture_closed(emulated_cuda.emulator)
    assert torch.equal(fallback, eager) and torch.equal(again, eager)
    with torch.inference_mode(), pytest.raises(fastdiff.GraphCaptureError):
        _sampler(HostBranchDenoiser(), T=5).run_graph(z0, 5, strict=True)


# -- CUDA (skipped without a GPU) -----------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_a_model_with_item_trains_on_cuda_with_the_default_graph(caplog):
    """The real capture fails on ``.item()``; training goes on eagerly (one log line) and
    equals a run with cuda_graph=False within the GPU's run-to-run differences."""

    def run(**kw):
        torch.manual_seed(0)
        return fastdiff.train(tiny_data(n=20), model=HostReadingModel(), steps=7, batch_size=8,
                              **{**TINY, "device": "cuda"}, **kw)  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        fallback = run()
    assert any("the capture failed" in r.getMessage() for r in caplog.records)
    eager, again = run(cuda_graph=False), run(cuda_graph=False)
    assert max_diff(fallback.model, eager.model) <= 1e-4 + 4 * max_diff(eager.model, again.model)
    with pytest.raises(fastdiff.GraphCaptureError):
        run(strict=True)
    sampler = Sampler(HostBranchDenoiser().cuda(), fastdiff.NoiseSchedule.linear(20).to("cuda"),
                      precision=resolve_precision("fp32", torch.device("cuda")),
                      channels_last=False)  # fmt: skip
    z0 = torch.randn(2, 1, 8, 8, device="cuda")
    with torch.inference_mode():
        eager_chain = sampler.run_eager(StepBuffers(z0.clone(), sampler.timesteps[0], 5)).clone()
        assert torch.equal(sampler.run_graph(z0, 5), eager_chain) and sampler.graph_failed


@needs_cuda
def test_a_cpu_checkpoint_resumes_in_the_cuda_graph_step(tmp_path):
    """A CPU run's checkpoint (AdamW state on the host, not fused; CPU generator states,
    which a CUDA generator refuses: the resume reseeds them) resumes in the captured CUDA
    step: the state moves to the GPU, the step counter advances inside replays, and the
    result is the eager CUDA step's from the same checkpoint."""
    kw = dict(batch_size=8, log_every=3, checkpoint_every=3, lr=1e-3, n_samples=1, **TINY)
    kw["precision"] = "fp32"
    fastdiff.train(tiny_data(), steps=3, out_dir=tmp_path / "a", **kw)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cuda = {**kw, "device": "cuda"}
    graphed = fastdiff.train(tiny_data(), steps=9, out_dir=tmp_path / "a", resume=True,
                             strict=True, **cuda)  # fmt: skip
    eager = fastdiff.train(tiny_data(), steps=9, out_dir=tmp_path / "b", resume=True,
                           cuda_graph=False, **cuda)  # fmt: skip
    assert max_diff(graphed.model, eager.model) <= 1e-4  # the same fp32 steps, graphed or not


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_the_second_gpu_equal_the_first(monkeypatch):
    from fastdiff import ops

    schedule = fastdiff.NoiseSchedule.linear(50)
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 7, 20, 49])
    out = {}
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):  # cuda:0 current while cuda:1 tensors are used
            s = schedule.to(dev)
            z = ops.q_sample(x.to(dev), t.to(dev), s, seed=3)
            step = ops.reverse_step(z, z * 0.5, t.to(dev), s, seed=4)
            loss = ops.noise_loss(z, t.to(dev), seed=3)
            w, b = torch.ones(3, device=dev), torch.zeros(3, device=dev)
            gn = ops.group_norm_silu(z.contiguous(memory_format=torch.channels_last), 3, w, b)
        out[dev] = [v.cpu() for v in (z, step, loss, gn)]
    for a, b in zip(out["cuda:0"], out["cuda:1"], strict=True):
        assert torch.equal(a, b)
