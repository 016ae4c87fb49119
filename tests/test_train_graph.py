"""The training step as one CUDA graph (fastdiff.train_graph).

CPU: the device-resident step function (device step counter, lr schedule, EMA decay, seeds,
on-device batch indexing, fused capturable AdamW) runs eagerly and is checked against the
eager step; capture, replay, resume and the fallbacks run through the CUDA-graph emulation in
tests/test_graph_capture.py.  CUDA (skipped without a GPU): the captured
and replayed step against the eager step, no host synchronisation inside replays, exact
resume, data streamed from host memory.
"""

import logging
import re
import types

import pytest
import torch
from test_training import tiny_data
from torch.utils.data import Dataset, TensorDataset

import fastdiff
from fastdiff import cli, train_graph, training
from fastdiff.data import InMemoryBatches, StreamingBatches, resolve_data
from fastdiff.distributed import DistInfo
from fastdiff.ema import EMA
from fastdiff.low_precision import sampling_model
from fastdiff.precision import memory_format, resolve_precision
from fastdiff.schedule import NoiseSchedule
from fastdiff.training import TrainConfig, _Run, model_for_data

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def graph_on_cpu(monkeypatch):
    """Runs asking for cuda_graph get the GraphStep on CPU, run eagerly (no capture): the
    device-resident step function against the eager step.  Capture and replay are tested
    through the CUDA-graph emulation in tests/test_graph_capture.py."""
    monkeypatch.setattr(
        train_graph, "graph_enabled", lambda requested, device, dist, strict=False: requested
    )


def make_run(data, device="cpu", *, graph, precision="fp32", batch_size=8, log_every=50,
             channels_last=False) -> _Run:  # fmt: skip
    """A tiny-preset run built the way fastdiff.train builds it."""
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = TrainConfig(steps=10**6, batch_size=batch_size, lr=1e-3, warmup_steps=3,
                      log_every=log_every, precision=precision)  # fmt: skip
    model = model_for_data((1, 8, 8), "tiny").to(dev, memory_format=memory_format(channels_last))
    source = data if isinstance(data, Dataset) else resolve_data(data)
    prec = resolve_precision(precision, dev)
    return _Run(model, NoiseSchedule.linear(50).to(dev), source, (1, 8, 8), cfg, dev, prec,
                channels_last, 0, cuda_graph=graph)  # fmt: skip


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def state_equal(a, b) -> bool:
    """Nested dicts / lists / tensors equal exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    return a == b


# -- the per-step values ----------------------------------------------------------------------

STEPS = [0, 1, 2, 3, 7, 8, 9, 10, 99, 499, 500, 501, 10_000, 89_990, 89_991, 10**9]


@pytest.mark.parametrize("warmup", [0, 1, 7, 500])
def test_device_lr_schedule_is_the_eager_one_bit_for_bit(warmup):
    cfg = TrainConfig(steps=1, batch_size=1, lr=3e-4, warmup_steps=warmup)
    k = torch.tensor(STEPS)
    run = types.SimpleNamespace(cfg=cfg)  # lr_at reads only the config
    want = torch.tensor([_Run.lr_at(run, s) for s in STEPS], dtype=torch.float64)
    assert torch.equal(train_graph.lr_schedule(k, cfg.lr, warmup), want)


@pytest.mark.parametrize("decay", [0.9999, 0.999, 0.5, 0.0])
@pytest.mark.parametrize("power", [8.0, 0.0, 2.5])
def test_device_ema_decay_is_the_eager_one_bit_for_bit(decay, power):
    ema = EMA(torch.nn.Linear(1, 1), decay, power)
    want = torch.tensor([ema.decay_at(s) for s in STEPS], dtype=torch.float64)
    assert torch.equal(train_graph.ema_decay(torch.tensor(STEPS), decay, power), want)


@pytest.mark.parametrize("seed,rank,world", [(0, 0, 1), (7, 1, 2), (2**31 - 1, 3, 4)])
def test_device_step_seed_is_training_step_seed(seed, rank, world):
    want = torch.tensor([training.step_seed(seed, s, rank, world) for s in STEPS])
    assert torch.equal(train_graph.step_seed(torch.tensor(STEPS), seed, rank, world), want)


def test_ema_update_with_a_device_weight_equals_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    a, b = EMA(model, 0.99), EMA(model, 0.99)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        a.update(step)
        b.update_with(torch.tensor(1.0 - b.decay_at(step), dtype=torch.float32))
    assert max_diff(a.shadow, b.shadow) < 1e-6
    assert torch.equal(a.shadow[1].running_mean, b.shadow[1].running_mean)


def test_graph_only_for_single_process_cuda_with_the_triton_ops(monkeypatch, caplog):
    """A graph only where the step can be captured: CUDA, one process, the fused ops on their
    Triton path (the reference reads the seed on the host), a torch that registers
    generators; each refusal logs one line naming the cause, or raises in strict mode."""

    class Graph:
        def register_generator_state(self, generator): ...

    cuda, single = torch.device("cuda"), DistInfo()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(fastdiff.ops, "triton_available", lambda: True)
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    assert train_graph.graph_enabled(True, cuda, single)
    assert not train_graph.graph_enabled(False, cuda, single)
    assert not train_graph.graph_enabled(True, torch.device("cpu"), single)

    def refused(dist=single, match=""):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastdiff"):
            assert not train_graph.graph_enabled(True, cuda, dist)
        [record] = caplog.records
        assert record.getMessage().startswith("fastdiff: training step: cuda_graph: ")
        assert match in record.getMessage()
        with pytest.raises(fastdiff.GraphCaptureError, match=re.escape(match)):
            train_graph.graph_enabled(True, cuda, dist, strict=True)

    refused(DistInfo(rank=0, world=2), "multi-process (DDP)")
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    refused(match="FASTDIFF_BACKEND=reference")
    monkeypatch.delenv("FASTDIFF_BACKEND")
    monkeypatch.setattr(fastdiff.ops, "triton_available", lambda: False)
    refused(match="Triton not installed")
    monkeypatch.setattr(fastdiff.ops, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", type("OldGraph", (), {}))
    refused(match="cannot register a generator")


def test_cli_graph_and_compile_flags(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(training, "train", lambda *args, **kwargs: seen.append(kwargs))
    base = ["train", "--out", str(tmp_path), "--steps", "1", "--no-progress"]
    assert cli.main(base) == 0
    assert cli.main([*base, "--no-cuda-graph", "--compile"]) == 0
    assert [(k["cuda_graph"], k["compile"]) for k in seen] == [(True, False), (False, True)]


# -- the step function on CPU against the eager step ----------------------------------------------


@pytest.mark.parametrize("source", ["in_memory", "streamed"])
def test_device_step_equals_the_eager_step(graph_on_cpu, source):
    """Same batches (20 images, batch 8: the 7 steps cross 3 epoch boundaries), t, noise, lr and
    EMA decay; the eager run gets the same fused capturable AdamW, so only the lr's fp32
    rounding and the EMA's arithmetic (sub/mul/add instead of lerp) differ."""
    data = tiny_data(n=20)
    if source == "streamed":
        data = TensorDataset(data)
    eager, device = make_run(data, graph=False), make_run(data, graph=True)
    kind = InMemoryBatches if source == "in_memory" else StreamingBatches
    assert isinstance(device.batches, kind) and device.graph_step is not None
    eager.optimizer = torch.optim.AdamW(
        eager.model.parameters(), lr=eager.cfg.lr, weight_decay=eager.cfg.weight_decay,
        fused=True, capturable=True,
    )  # fmt: skip
    for _ in range(7):
        eager.train_step()
        device.train_step()
    assert device.graph_step.graph is None  # nothing is captured off CUDA
    assert device.step == int(device.graph_step.counter) == 7
    assert device.losses[0] == eager.losses[0]  # step 0: same weights, batch, t and noise
    torch.testing.assert_close(device.losses, eager.losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(device.seed_buf, eager.seed_buf)
    assert torch.equal(device.t_gen.get_state(), eager.t_gen.get_state())
    assert state_equal(device.batches.state_dict(), eager.batches.state_dict())
    assert max_diff(device.model, eager.model) < 1e-6
    assert max_diff(device.ema.shadow, eager.ema.shadow) < 1e-6
    group = device.optimizer.param_groups[0]
    assert group["lr"] is device.graph_step.lr and group["capturable"] and group["fused"]
    assert torch.equal(group["lr"], torch.tensor(eager.lr_at(6), dtype=torch.float32))


def test_replays_bump_the_weights_versions(emulated_cuda):
    """A replay writes the weights without autograd seeing it (the emulated graph, like a real
    one, re-runs its ops below autograd); handing the weights out (``_Run.diffusion``, what
    grids and train() use) bumps their version counters as an eager step would, for caches
    keyed on them; the bf16 sampling copy (refreshed at every call) has the new EMA weights."""
    run = _run_steps(make_run(tiny_data(n=20), graph=True), train_graph.WARMUP_STEPS)
    assert run.graph_step.graph is not None  # captured after the last warm-up step
    shadow = run.ema.shadow
    bf16, cuda = resolve_precision("bf16", torch.device("cpu")), torch.device("cuda")
    sampling_model(run.diffusion().ema_model, bf16, cuda, channels_last=False)
    before, version = shadow.conv_in.bias.clone(), shadow.conv_in.bias._version
    run.train_step()  # one replay
    assert emulated_cuda.replays == 1 and not torch.equal(shadow.conv_in.bias, before)
    second = sampling_model(run.diffusion().ema_model, bf16, cuda, channels_last=False)
    assert shadow.conv_in.bias._version > version
    torch.testing.assert_close(second.conv_in.bias.float(), shadow.conv_in.bias, rtol=2**-8, atol=0)


# -- CUDA: the captured step ----------------------------------------------------------------------


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in fp32 (not TF32), so rounding differences stay small."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run_steps(run: _Run, n: int) -> _Run:
    for _ in range(n):
        run.train_step()
    return run


@needs_cuda
@pytest.mark.parametrize("source", ["in_memory", "streamed"])
def test_graph_matches_eager_on_cuda(no_tf32, source):
    """3 eager warm-up steps (the last followed by the capture), then 5 replays, against 8 eager
    steps: within the rounding the two step functions differ by (lr in fp32, EMA sub/mul/add vs
    lerp: 1e-4) plus a few times what two eager runs differ by on this GPU (atomics in the
    attention and cuDNN weight-gradient kernels change low bits from run to run, and AdamW's
    g / sqrt(v) turns that into lr-sized differences where a gradient is near 0)."""
    data = tiny_data(n=40)
    if source == "streamed":
        data = TensorDataset(data)
    graph = _run_steps(make_run(data, "cuda", graph=True, log_every=8), 8)
    eager = _run_steps(make_run(data, "cuda", graph=False, log_every=8), 8)
    again = _run_steps(make_run(data, "cuda", graph=False, log_every=8), 8)
    assert graph.graph_step is not None and graph.graph_step.graph is not None
    assert int(graph.graph_step.counter) == graph.step == 8
    noise = (graph.losses - eager.losses).abs().max().item()
    assert noise <= 1e-5 + 4 * (eager.losses - again.losses).abs().max().item()
    for name in ("model", "shadow"):
        a, b, c = (getattr(r, name) if name == "model" else r.ema.shadow
                   for r in (graph, eager, again))  # fmt: skip
        assert max_diff(a, b) <= 1e-4 + 4 * max_diff(b, c), name
    assert state_equal(graph.batches.state_dict(), eager.batches.state_dict())
    assert torch.equal(graph.t_gen.get_state(), eager.t_gen.get_state())


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_replays_do_not_synchronise(precision):
    """Replays (and the host work between them: epoch permutations, counter) make no host-device
    synchronisation; the GradScaler's fp16 scale stays on the device inside the graph."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this device")
    run = make_run(tiny_data(n=64), "cuda", graph=True, precision=precision, batch_size=16,
                   log_every=16, channels_last=True)  # fmt: skip
    _run_steps(run, train_graph.WARMUP_STEPS)  # the last one captures
    assert run.graph_step.graph is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_steps(run, 9)  # 64 images / 16: new epochs start at steps 4 and 8
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(run.graph_step.counter) == run.step == 12
    assert torch.isfinite(run.losses[:12]).all() and (run.losses[:12] > 0).all()


def _train_cuda(data, out, steps, **kw):
    return fastdiff.train(
        data, steps=steps, out_dir=out, device="cuda", preset="tiny", T=50, batch_size=8,
        warmup_steps=2, lr=1e-3, log_every=3, checkpoint_every=6, n_samples=2, progress=False,
        precision="fp32", **kw,
    )  # fmt: skip


@needs_cuda
def test_graph_resume_is_exact_on_cuda(tmp_path):
    """12 graph steps == 6 graph steps + checkpoint + resume to 12 (whose first 3 steps are the
    eager warm-up before the new capture).  Exact up to the GPU's own run-to-run differences:
    bit for bit where two straight runs agree bit for bit, else within a few times their
    difference (atomics in some backward kernels make it vary from pair to pair)."""
    torch.backends.cudnn.deterministic = True
    try:
        data = tiny_data()
        first = _train_cuda(data, tmp_path / "a", 12)
        second = _train_cuda(data, tmp_path / "b", 12)
        _train_cuda(data, tmp_path / "c", 6)
        resumed = _train_cuda(data, tmp_path / "c", 12, resume=True)
    finally:
        torch.backends.cudnn.deterministic = False
    for name in ("model", "ema_model"):
        a, b, c = (getattr(d, name) for d in (first, second, resumed))
        assert max_diff(a, c) <= 4 * max_diff(a, b), name
