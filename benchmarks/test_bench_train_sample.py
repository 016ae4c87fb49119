"""Whole training steps and sampling runs: fastdiff against the same work written the usual way.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=FILE`` for extra_info).
Each group holds every side of one comparison, timed in the same run; the terminal summary
prints the median ratio of every two sides that differ in one attribute (impl, precision,
layout).

Training step (Algorithm 20.1), images/s = batch * steps per call / median (one call = 1
step on CPU, 10 on CUDA, so that the host runs ahead of the GPU as in a training loop):

* ``fastdiff_graph`` (CUDA): ``fastdiff.training._Run.train_step()``, the run built as
  ``fastdiff.train`` builds it (linear T=1000 schedule, AdamW lr 2e-4 with warm-up, clipping
  1.0, EMA 0.9999, the CLI's defaults), on a small in-memory data set: the whole step
  captured as one CUDA graph after 3 eager steps and replayed (fastdiff.train_graph; the
  warm-up rounds cover the capture).
* ``fastdiff_eager``: the same run with ``cuda_graph=False`` (on CPU, where there is no graph,
  this is ``fastdiff``): fused q_sample / noise_loss with in-kernel noise (on CPU the torch
  reference path of those ops), NVTX phase ranges, the loss kept on the device.
* ``compile=on``: the same with ``compile=True`` (the model through torch.compile, Inductor's
  default mode; compilation happens in the warm-up rounds).
* ``eager``: the same model, optimizer, clipping, autocast and EMA (torch._foreach_lerp_, as
  fastdiff.ema does), with the noising and loss the usual way: t = torch.randint,
  eps = torch.randn_like(x), z = sqrt_ac[t] x + sqrt_1m_ac[t] eps, F.mse_loss(pred.float(), eps)
  (test_bench_ops.eager_q_sample).  Same batch source as the fastdiff side.

Sampling (Algorithm 20.2), s/step = median / T with a linear T=20 schedule (one call = 20
denoising steps on a batch):

* ``fastdiff_eager``: ``fastdiff.sampling.run_sampler`` with ``cuda_graph=False`` (the step
  function on static buffers, fused reverse step); what CPU users get.  Both fastdiff sides
  run what ``sample()`` runs: with bf16 on CUDA the bf16 copy of the UNet's weights
  (fastdiff.low_precision, refreshed inside the timed call as ``sample()`` does), where the
  ``eager`` baseline autocasts fp32 weights.
* ``fastdiff_graph`` (CUDA only): ``run_sampler`` with ``cuda_graph=True``: the step captured
  once as a CUDA graph (capture happens in the warm-up rounds) and replayed T times.
* ``eager``: a plain loop: model forward under the same autocast, the reverse-step formula in
  torch ops with torch.randn_like (test_bench_ops.eager_reverse_step).

CPU cases: the "digits" preset on 1x16x16, batch 64 (what ``fastdiff train`` runs by default);
few rounds, since one step takes ~0.25 s on 2 cores.  CUDA cases (skipped without CUDA): the
"cifar10" preset (35.7M parameters) on 3x32x32, batch 128, and the digits preset at batch 64
(the CLI's default job); sampling the cifar10 preset at n = 1, 16, 128 and 256.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_bench_ops import eager_q_sample, eager_reverse_step

from fastdiff import NoiseSchedule
from fastdiff.data import resolve_data
from fastdiff.low_precision import sampling_model
from fastdiff.precision import memory_format, resolve_precision
from fastdiff.sampling import Sampler, run_sampler
from fastdiff.training import TrainConfig, _Run, _schedule, model_for_data

NO_CUDA_REASON = "CUDA is not available: the CUDA train/sample benchmark cases need a GPU"
SAMPLE_T = 20
#: Under --benchmark-disable (tests/test_benchmarks_run.py runs every benchmark once to show
#: that it runs; nothing is timed) the CPU cases shrink to this batch and these sampling
#: steps: the same code paths at a tenth of the cost.
SMOKE_BATCH, SMOKE_T = 8, 3
DATA_IMAGES = 256  # the in-memory data set: a few batches of random images in [-1, 1]
SEED = 0
#: The training settings of the fastdiff CLI's defaults (warm-up 200 steps, the rest as train()).
CLI_WARMUP = 200


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    preset: str
    image_shape: tuple[int, int, int]
    batch: int
    impl: str  # train and sample: fastdiff_graph / fastdiff_eager / eager; CPU train: fastdiff
    precision: str  # fp32 / bf16 / fp16
    channels_last: bool
    rounds: int
    warmup_rounds: int
    compile: bool = False  # train(compile=True)
    steps_per_call: int = 1  # training steps per timed call

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def shape_id(self) -> str:
        return "x".join(map(str, self.image_shape))

    @property
    def id(self) -> str:
        suffix = "-compile" if self.compile else ""
        return (
            f"{self.device}-{self.preset}-b{self.batch}-{self.precision}-{self.layout}-{self.impl}"
            + suffix
        )

    def group(self, what: str) -> str:
        return f"{what} {self.device} {self.preset} {self.shape_id} b{self.batch}"

    def attrs(self) -> dict:
        return {
            "impl": self.impl,
            "precision": self.precision,
            "layout": self.layout,
            "compile": "on" if self.compile else "off",
        }

    def info(self, prec) -> dict:
        dtype = prec.autocast_dtype or torch.float32
        return {
            "preset": self.preset,
            "batch": self.batch,
            "image_shape": list(self.image_shape),
            "channels_last": self.channels_last,
            "autocast_dtype": str(dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
        }


def _cpu(impl, precision, channels_last, rounds, warmup):
    return Case("cpu", "digits", (1, 16, 16), 64, impl, precision, channels_last, rounds, warmup)


def _cuda(impl, precision, channels_last, rounds, warmup, *, preset="cifar10", batch=128, **kw):
    shape = (3, 32, 32) if preset == "cifar10" else (1, 16, 16)
    return Case("cuda", preset, shape, batch, impl, precision, channels_last, rounds, warmup, **kw)


def _cuda_train(impl, precision="bf16", channels_last=True, **kw):
    """10 timed calls of 10 steps after 2 warm-up calls (Triton compilation, the graph's eager
    warm-up steps and its capture in the first; the first replays in the second), 3 with
    compile=True (torch.compile's compilation and recompilations).  A cifar10 call is ~0.4 s
    on an H200, with a small spread between calls (the host runs ahead of the GPU): 10 give a
    stable median, and the 8 CUDA cases of benchmarks/gpu_check.py's bench-train part fit its
    100 s."""
    warmup = 3 if kw.get("compile") else 2
    return _cuda(impl, precision, channels_last, 10, warmup, steps_per_call=10, **kw)


#: CPU: one step ~0.25 s (fp32) on 2 cores, so 10 timed rounds after 2 warm-up calls.
TRAIN_CASES = [
    _cpu("fastdiff", "fp32", False, 10, 2),
    _cpu("fastdiff", "fp32", True, 10, 2),
    _cpu("fastdiff", "bf16", False, 10, 2),
    _cpu("fastdiff", "bf16", True, 10, 2),
    _cpu("fastdiff", "fp16", False, 5, 1),  # fp16 autocast + GradScaler: slow on CPU
    _cpu("eager", "fp32", False, 10, 2),
    _cpu("eager", "bf16", False, 10, 2),  # the CPU "auto" choice on AMX machines
    # compile=True: Inductor's C++ compilation of forward and backward takes the warm-up call.
    Case("cpu", "digits", (1, 16, 16), 64, "fastdiff", "bf16", False, 5, 1, compile=True),
    # CUDA, cifar10 preset: channels_last (fastdiff's default there) in bf16 / fp32 / fp16 for
    # the three sides; the graph in bf16 contiguous (layout ratio) and with compile=True.
    *(
        _cuda_train(impl, p)
        for p in ("bf16", "fp32", "fp16")
        for impl in ("fastdiff_graph", "fastdiff_eager", "eager")
    ),
    _cuda_train("fastdiff_graph", channels_last=False),
    _cuda_train("fastdiff_graph", compile=True),
    _cuda_train("fastdiff_eager", compile=True),
    # CUDA, the default job's model: digits preset, batch 64.
    *(
        _cuda_train(impl, preset="digits", batch=64)
        for impl in ("fastdiff_graph", "fastdiff_eager", "eager")
    ),
]

#: CUDA sampling: 6 timed calls after 2 warm-up calls (the graph's capture, Triton's and
#: cuDNN's first calls).  A call is at most ~0.4 s on an H200 (n = 256; a graph replay or a
#: fixed eager loop, little spread), so the 13 cases (9 sampling, 4 guided) of
#: benchmarks/gpu_check.py's bench-sample part fit its 70 s with the start-up.
SAMPLE_CUDA_ROUNDS = (6, 2)

#: One call = SAMPLE_T denoising steps (CPU: ~1.3 s per call on 2 idle cores).
SAMPLE_CASES = [
    _cpu("fastdiff_eager", "fp32", False, 5, 1),
    _cpu("fastdiff_eager", "fp32", True, 5, 1),
    _cpu("fastdiff_eager", "bf16", False, 5, 1),
    _cpu("eager", "fp32", False, 5, 1),
    *(
        _cuda(impl, "bf16", True, *SAMPLE_CUDA_ROUNDS)
        for impl in ("fastdiff_graph", "fastdiff_eager", "eager")
    ),
    # s/step against the batch size: the graph removes the per-step host cost that dominates
    # small batches.
    *(
        _cuda(impl, "bf16", True, *SAMPLE_CUDA_ROUNDS, batch=n)
        for n in (1, 16, 256)
        for impl in ("fastdiff_graph", "fastdiff_eager")
    ),
]


def _params(cases):
    out = []
    for c in cases:
        marks = []
        if c.device == "cuda":
            marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON))
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def _sized(case: Case, benchmark) -> tuple[Case, int]:
    """(case, sampling steps): as declared when timing; CPU cases at the smoke size when not."""
    if benchmark.enabled or case.device != "cpu":
        return case, SAMPLE_T
    return dataclasses.replace(case, batch=SMOKE_BATCH), SMOKE_T


def _check_supported(case: Case) -> None:
    if case.device == "cuda" and case.precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device does not support bf16")


@pytest.fixture(scope="module")
def base_model():
    """``base_model(case)``: the case's preset built once per (preset, shape) on CPU, seeded as
    fastdiff.train seeds it; each test takes a deep copy (training changes the weights)."""
    cache = {}

    def get(case: Case):
        key = (case.preset, case.image_shape)
        if key not in cache:
            torch.manual_seed(SEED)
            cache[key] = model_for_data(case.image_shape, case.preset)
        return copy.deepcopy(cache[key])

    return get


@pytest.fixture(scope="module")
def data_set():
    """``data_set(case)``: DATA_IMAGES random images of the case's shape in [-1, 1] (CPU)."""
    cache = {}

    def get(case: Case):
        if case.image_shape not in cache:
            g = torch.Generator().manual_seed(SEED)
            cache[case.image_shape] = (
                torch.rand(DATA_IMAGES, *case.image_shape, generator=g) * 2 - 1
            )
        return cache[case.image_shape]

    return get


# -- training ---------------------------------------------------------------------------------


def _fastdiff_run(case: Case, model, data) -> _Run:
    """A training run set up the way fastdiff.train sets it up (minus output and resume)."""
    dev = torch.device(case.device)
    cfg = TrainConfig(
        steps=10**9, batch_size=case.batch, warmup_steps=CLI_WARMUP, precision=case.precision,
        channels_last=case.channels_last, seed=SEED,
    )  # fmt: skip
    prec = resolve_precision(case.precision, dev)
    sched = _schedule("linear", 1000).to(dev)
    source = resolve_data(data)
    model.to(dev, memory_format=memory_format(case.channels_last)).train()
    graph = case.impl == "fastdiff_graph"
    # strict: a step that cannot be captured raises (in the warm-up rounds, before anything
    # is timed) instead of training on eagerly under the graph's name.
    return _Run(model, sched, source, case.image_shape, cfg, dev, prec, case.channels_last, 0,
                cuda_graph=graph, compile=case.compile, strict=graph)  # fmt: skip


class EagerTrainer:
    """The same step the usual way: eager noising and F.mse_loss, same optimizer and EMA."""

    def __init__(self, run: _Run):
        self.model, self.batches, self.cfg = run.model, run.batches, run.cfg
        self.device, self.prec, self.T = run.device, run.prec, run.schedule.T
        self.fmt = memory_format(run.channels_last)
        self.sqrt_ac = run.schedule.table("sqrt_alphas_cumprod")
        self.sqrt_1m_ac = run.schedule.table("sqrt_one_minus_alphas_cumprod")
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
            fused=self.device.type == "cuda" or None,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.prec.grad_scaling)
        self.shadow = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.shadow_params = list(self.shadow.parameters())
        self.buffers = list(zip(self.shadow.buffers(), self.model.buffers(), strict=True))
        self.step = 0

    def train_step(self) -> torch.Tensor:
        cfg, k = self.cfg, self.step
        x = self.batches.next_batch().contiguous(memory_format=self.fmt)
        t = torch.randint(0, self.T, (x.shape[0],), device=self.device)
        z, eps = eager_q_sample(x, t, self.sqrt_ac, self.sqrt_1m_ac)
        with self.prec.autocast(self.device):
            pred = self.model(z, t)
        loss = F.mse_loss(pred.float(), eps)
        self.scaler.scale(loss).backward()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (k + 1) / cfg.warmup_steps)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1.0 + k) / (10.0 + k))
            torch._foreach_lerp_(self.shadow_params, self.params, 1.0 - decay)
            for sb, mb in self.buffers:
                sb.copy_(mb)
        self.step = k + 1
        return loss.detach()


@pytest.mark.parametrize("case", _params(TRAIN_CASES))
def test_train_step(measure_rounds, benchmark, base_model, data_set, case):
    _check_supported(case)
    if case.compile and case.device == "cpu" and not benchmark.enabled:
        # tests/test_compile.py trains with compile=True on CPU; here the untimed single run
        # would spend minutes in Inductor's C++ compilation (about 2 min on 2 cores).
        pytest.skip("compile=True on CPU is only run when timing (--benchmark-only)")
    case, _ = _sized(case, benchmark)
    run = _fastdiff_run(case, base_model(case), data_set(case))
    prec = run.prec
    # The eager side borrows the run's model, batch source and settings, nothing else.
    step = EagerTrainer(run).train_step if case.impl == "eager" else run.train_step

    def fn():
        for _ in range(case.steps_per_call):
            step()

    measure_rounds(
        fn,
        group=case.group("train_step"),
        side=case.id.split(f"b{case.batch}-", 1)[1],
        device=case.device,
        rounds=case.rounds,
        warmup_rounds=case.warmup_rounds,
        derive=lambda median: {
            "images_per_s": round(case.batch * case.steps_per_call / median, 1),
            "ms_per_step": round(median / case.steps_per_call * 1e3, 3),
        },
        attrs=case.attrs(),
        what="train_step",
        steps_per_call=case.steps_per_call,
        **case.info(prec),
    )
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    if case.impl == "fastdiff_graph":
        assert run.graph_step is not None and run.graph_step.graph is not None


# -- sampling ---------------------------------------------------------------------------------


def _eager_sampler(model, schedule, prec, case: Case):
    """Algorithm 20.2 the usual way: forward, reverse-step formula in torch ops, randn_like."""
    dev = torch.device(case.device)
    betas = schedule.table("betas")
    alphas_cumprod = schedule.table("alphas_cumprod")
    sigma = schedule.table("sigma_beta")
    fmt = memory_format(case.channels_last)
    shape = (case.batch, *case.image_shape)

    def sample():
        with torch.inference_mode():
            z = torch.randn(shape, device=dev).contiguous(memory_format=fmt)
            for i in reversed(range(schedule.T)):
                t = torch.full((case.batch,), i, dtype=torch.long, device=dev)
                with prec.autocast(dev):
                    pred = model(z, t)
                z = eager_reverse_step(z, pred, t, betas, alphas_cumprod, sigma)
            return z.float().clamp_(-1.0, 1.0)

    return sample


def assert_graph_replayed(sampler, batch: int) -> None:
    """The timed calls replayed a captured graph for this batch size, not the eager chain.

    ``run_sampler(..., strict=True)`` already raises where a capture fails or the step is
    not capturable; this also catches a fallback that bypassed strict mode.  A failed capture
    sets ``SamplerRunner.graph_failed`` (the sampler runs eagerly from then on); a captured
    one is cached in ``SamplerRunner._graphs`` under its batch size.
    """
    assert not sampler.graph_failed, "the sampling graph's capture failed: eager was timed"
    assert batch in sampler._graphs, f"no sampling graph was captured for batch {batch}"


@pytest.mark.parametrize("case", _params(SAMPLE_CASES))
def test_sample(measure_rounds, benchmark, base_model, case):
    _check_supported(case)
    case, steps = _sized(case, benchmark)
    dev = torch.device(case.device)
    prec = resolve_precision(case.precision, dev)
    schedule = NoiseSchedule.linear(steps).to(dev)
    model = base_model(case).to(dev, memory_format=memory_format(case.channels_last))
    model.eval().requires_grad_(False)
    if case.impl == "eager":
        fn = _eager_sampler(model, schedule, prec, case)
    else:
        copy = sampling_model(model, prec, dev, case.channels_last)  # sample()'s: bf16 copy
        sampler = Sampler(copy, schedule, precision=prec, channels_last=case.channels_last)
        graph = case.impl == "fastdiff_graph"

        def fn():
            sampling_model(model, prec, dev, case.channels_last)  # the per-call refresh
            return run_sampler(sampler, case.batch, case.image_shape, dev, seed=SEED,
                               batch_size=case.batch, cuda_graph=graph, strict=graph)  # fmt: skip

    images = measure_rounds(
        fn,
        group=case.group(f"sample T={steps}"),
        side=case.id.split(f"b{case.batch}-", 1)[1],
        device=case.device,
        rounds=case.rounds,
        warmup_rounds=case.warmup_rounds,
        derive=lambda median: {"s_per_step": median / steps},
        attrs=case.attrs(),
        what="sample",
        steps=steps,
        **case.info(prec),
    )
    assert images.shape == (case.batch, *case.image_shape)
    assert torch.isfinite(images).all()
    if case.impl == "fastdiff_graph":
        assert_graph_replayed(sampler, case.batch)


# -- guided sampling --------------------------------------------------------------------------

#: Classifier-free guidance (a conditional model, 10 classes): the guided step (s = 3: one
#: model call on 2B rows, the fused step forming eps_u + s (eps_c - eps_u)) against the
#: unguided one (s = 1: B rows), same model, batch and sampler.  The issue's target: guided
#: costs at most 2x the unguided time (the model call dominates both).
GUIDANCE_CASES = [
    (case, scale)
    for case in (
        _cpu("fastdiff_eager", "fp32", False, 3, 1),
        _cuda("fastdiff_graph", "bf16", True, *SAMPLE_CUDA_ROUNDS),
        _cuda("fastdiff_graph", "bf16", True, *SAMPLE_CUDA_ROUNDS, preset="digits", batch=64),
    )
    for scale in (1.0, 3.0)
]


@pytest.mark.parametrize(
    "case, scale",
    [
        pytest.param(c, s, id=f"{c.id}-s{s:g}", marks=_params([c])[0].marks)
        for c, s in GUIDANCE_CASES
    ],
)
def test_guided_sample(measure_rounds, benchmark, case, scale):
    from fastdiff.samplers import Guidance, SamplerRunner, SamplerSpec

    _check_supported(case)
    case, steps = _sized(case, benchmark)
    dev = torch.device(case.device)
    prec = resolve_precision(case.precision, dev)
    schedule = NoiseSchedule.linear(steps).to(dev)
    torch.manual_seed(SEED)
    model = model_for_data(case.image_shape, case.preset, num_classes=10)
    model.to(dev, memory_format=memory_format(case.channels_last)).eval().requires_grad_(False)
    copy = sampling_model(model, prec, dev, case.channels_last)  # sample()'s: bf16 copy
    spec = SamplerSpec("ddpm", clip_x0=False, variance="beta")
    guidance = Guidance(10, scale)
    sampler = SamplerRunner(copy, schedule, spec, precision=prec,
                            channels_last=case.channels_last, guidance=guidance)  # fmt: skip
    labels = torch.arange(case.batch, device=dev) % 10
    graph = case.impl == "fastdiff_graph"

    def fn():
        sampling_model(model, prec, dev, case.channels_last)  # the per-call refresh
        return run_sampler(sampler, case.batch, case.image_shape, dev, seed=SEED,
                           batch_size=case.batch, cuda_graph=graph, strict=graph,
                           labels=labels)  # fmt: skip

    images = measure_rounds(
        fn,
        group=case.group(f"guided sample T={steps}"),
        side=f"{case.id.split(f'b{case.batch}-', 1)[1]}-s{scale:g}",
        device=case.device,
        rounds=case.rounds,
        warmup_rounds=case.warmup_rounds,
        derive=lambda median: {"s_per_step": median / steps},
        attrs={**case.attrs(), "guidance": "batched 2B" if scale != 1.0 else "off (s = 1)"},
        what="sample",
        steps=steps,
        guidance_scale=scale,
        **case.info(prec),
    )
    assert images.shape == (case.batch, *case.image_shape)
    assert torch.isfinite(images).all()
    if graph:
        assert_graph_replayed(sampler, case.batch)
