"""fastdiff's fused ops against the same math written the usual way in eager PyTorch.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=FILE`` for extra_info).

CUDA: device time (``test_device_time_*``).  Each side is captured as one CUDA graph of REPS
back-to-back calls and replayed REPLAYS times between two CUDA events, so the figure is the
GPU's time per call with no host overhead (the method of the 2026-11-28 measurements).  In
the same run, a device-to-device ``copy_`` of the same number of bytes is timed the same way:

    GB/s      = bytes_moved / device time
    % of copy = GB/s / the copy's GB/s          (>= 80% is the target for the noise ops)

That copy, like the op, replays into the same buffers, so a working set that fits the L2
cache (the bf16 64x3x256x256 tensors do on an H200) is timed against an L2-resident copy.
So the DRAM reference is also given, measured once per session in the same process: a copy
of 1 GiB into another 1 GiB buffer (2 GiB moved per call, far beyond any L2):

    % of 1 GiB copy = GB/s / the 1 GiB copy's GB/s   (extra_info: copy_1gib_gbps,
                                                     pct_of_1gib_copy)

Host overhead per call is reported on its own: the wall time of REPS eager calls issued back
to back without a synchronisation, divided by REPS.  pytest-benchmark times the graph replay
(host wall time including a synchronisation, per REPS calls); the table printed at the end of
the session and each test's extra_info carry the CUDA-event figures.

bytes_moved is the minimum each op must move (N = numel, s = itemsize; the (B,)-sized t and
table gathers are ignored):

    q_sample            read x, write z                          2 N s
    noise_loss fwd      read pred                                1 N s
    noise_loss fwd+bwd  read pred (fwd), read pred + write grad  3 N s
    reverse_step        read z, read pred, write out             3 N s
    ddim_step           read z, read pred, write out             3 N s
    dpm_solver_step     read z, pred, x0_prev; write out, x0     5 N s
    group_norm_silu     read x, write out (fwd); + read x, read d out, write dx (bwd): 2 / 5 N s

Shapes: 128x3x32x32 (CIFAR batch), 64x3x256x256 (ImageNet-256 batch), 256x4x64x64 (latent
batch), channels_last (the U-Net's layout on CUDA) plus contiguous for the middle one, bf16
and fp32.  GroupNorm+SiLU: U-Net activations (cifar10 preset: 128 channels at 32x32, 256 at
16x16, 384 = 32 groups of 12 at 16x16) against torch's GroupNorm then SiLU on the same
channels_last tensors.

CPU (``test_q_sample`` etc.): host time of one call (pytest-benchmark), fastdiff's torch
reference path vs eager torch, as a CPU user sees it.  CUDA cases skip without a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from fastdiff import NoiseSchedule, ops

SEED = 1234
REPS, REPLAYS = 20, 10
DEVICE = "cuda"  # of the device-time cases
NO_CUDA = not torch.cuda.is_available()
NO_CUDA_REASON = "CUDA is not available: the device-time cases need a GPU"

# Eager bytes, in units of N * itemsize (elementwise kernels; (B,)-sized ops ignored):
#   q_sample: randn_like writes eps (1); a*x reads x, writes tmp (2); b*eps reads eps, writes
#   tmp (2); tmp + tmp reads 2, writes z (3).
EAGER_Q_SAMPLE = 1 + 2 + 2 + 3  # 8
#   loss: the q_sample above (8); F.mse_loss forward writes the unreduced (pred - eps)^2 from
#   pred and eps (3) and mean() reads it back (1); mse_loss_backward reads pred and eps and
#   writes grad (3) (AccumulateGrad steals that buffer since pred.grad is reset to None).
EAGER_LOSS = EAGER_Q_SAMPLE + 3 + 1 + 3  # 15
#   reverse step: c*pred (2); z - tmp (3); tmp / c2 (2); randn_like (1); sigma*eps (2);
#   mu + tmp (3).
EAGER_REVERSE = 2 + 3 + 2 + 1 + 2 + 3  # 13

#   ddim step (eta = 0, no clip): sqrt(1 - a) pred (2); z - tmp (3); / sqrt(a) (2);
#   sqrt(a') x0 (2); dir pred (2); sum (3).
EAGER_DDIM = 2 + 3 + 2 + 2 + 2 + 3  # 14
#   dpm step: q pred (2); p z (2); x0 = - (3); x0 - prev (3); c tmp (2); a z (2); b x0 (2);
#   two sums (3 + 3); x0 kept (copy: 2).
EAGER_DPM = 2 + 2 + 3 + 3 + 2 + 2 + 2 + 3 + 3 + 2  # 24

FUSED_Q_SAMPLE = 2
FUSED_LOSS = FUSED_Q_SAMPLE + 3
FUSED_REVERSE = 3
FUSED_DDIM = 3
FUSED_DPM = 5


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def eager_q_sample(x, t, sqrt_ac, sqrt_1m_ac):
    eps = torch.randn_like(x)
    return _per_sample(sqrt_ac[t], x) * x + _per_sample(sqrt_1m_ac[t], x) * eps, eps


def eager_reverse_step(z, pred, t, betas, alphas_cumprod, sigma):
    b, ac = betas[t], alphas_cumprod[t]
    coef_eps = _per_sample(b / torch.sqrt(1 - ac), z)
    coef_div = _per_sample(torch.sqrt(1 - b), z)
    sig = _per_sample(sigma[t] * (t > 0), z)  # no noise at the last step (index 0)
    return (z - coef_eps * pred) / coef_div + sig * torch.randn_like(z)


def eager_ddim_step(z, pred, t, t_prev, alphas_cumprod):
    """DDIM with eta = 0 and no clipping, written the usual way."""
    a, a_prev = _per_sample(alphas_cumprod[t], z), _per_sample(alphas_cumprod[t_prev], z)
    x0 = (z - torch.sqrt(1 - a) * pred) / torch.sqrt(a)
    return torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev) * pred


def eager_dpm_step(z, pred, x0_prev, row):
    """DPM-Solver++ 2M with row = (P, Q, A, B, C) written the usual way: returns (z', x0)."""
    p, q, a, b, c = (row[i].to(z.dtype) for i in range(5))
    x0 = p * z - q * pred
    return a * z + b * x0 + c * (x0 - x0_prev), x0


def _sampler_step_sides(sampler, z, pred, t, schedule):
    """(fastdiff fn, eager fn, fused units, eager units) of one ddim / dpm++2m update, on the
    same tensors; dpm uses a second-order row of the 20-step table (C != 0)."""
    if sampler == "ddim":
        t_prev = (t - 20).clamp(min=-1)
        ac = schedule.table("alphas_cumprod")
        return (
            lambda: ops.ddim_step(z, pred, t, t_prev, schedule, seed=SEED, validate=False),
            lambda: eager_ddim_step(z, pred, t, t_prev.clamp(min=0), ac),
            FUSED_DDIM,
            EAGER_DDIM,
        )
    from fastdiff.samplers.dpm_solver import dpm_coefficients, dpm_timesteps

    rows = dpm_coefficients(schedule.alphas_cumprod.cpu().numpy(), dpm_timesteps(schedule.T, 20))
    coefs = torch.from_numpy(rows).float().to(z.device)
    step = torch.tensor([10], device=z.device)
    x0_prev = torch.zeros_like(z)

    def eager():  # keeps x0 for the next step, as the fused op does
        out, x0 = eager_dpm_step(z, pred, x0_prev, coefs[10])
        x0_prev.copy_(x0)
        return out

    return (
        lambda: ops.dpm_solver_step(z, pred, step, x0_prev, coefs, validate=False),
        eager,
        FUSED_DPM,
        EAGER_DPM,
    )


# -- CPU: host time per call (the reference path) --------------------------------------------


def _side(case, impl) -> str:
    return f"fastdiff_{case.backend}" if impl == "fastdiff" else "eager"


def _check_backend(case, x) -> str:
    """The backend fastdiff will use for x; skip if it is not the one the test id names."""
    try:
        actual = ops.backend_for(x)
    except (RuntimeError, ValueError) as exc:  # e.g. FASTDIFF_BACKEND=triton on CPU tensors
        pytest.skip(f"default dispatch overridden: {exc}")
    if actual != case.backend:
        pytest.skip(f"FASTDIFF_BACKEND sends this case to {actual}, the id says {case.backend}")
    return actual


def _t(case, schedule) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, schedule.T, (case.shape[0],), generator=g).to(case.device)


def _info(case, impl, backend) -> dict:
    return {**case.info(), "backend": backend if impl == "fastdiff" else "eager"}


def test_q_sample(benchmark, measure, case, impl, schedule):
    x = case.tensor()
    t = _t(case, schedule)
    backend = _check_backend(case, x)
    if impl == "fastdiff":

        def fn():
            return ops.q_sample(x, t, schedule, seed=SEED, validate=False)

        units = FUSED_Q_SAMPLE
    else:
        sqrt_ac = schedule.table("sqrt_alphas_cumprod")
        sqrt_1m_ac = schedule.table("sqrt_one_minus_alphas_cumprod")

        def fn():
            return eager_q_sample(x, t, sqrt_ac, sqrt_1m_ac)[0]

        units = EAGER_Q_SAMPLE
    z = measure(
        fn,
        group=case.group("q_sample"),
        side=_side(case, impl),
        bytes_moved=units * case.numel * case.itemsize,
        **_info(case, impl, backend),
    )
    assert z.shape == x.shape and z.dtype == x.dtype


def test_loss_fwd_bwd(benchmark, measure, case, impl, schedule):
    """One training step's noising and loss, forward and backward (pred stands for the model)."""
    x = case.tensor()
    pred = case.tensor(requires_grad=True)
    t = _t(case, schedule)
    backend = _check_backend(case, x)
    if impl == "fastdiff":

        def fn():
            pred.grad = None
            z = ops.q_sample(x, t, schedule, seed=SEED, validate=False)
            loss = ops.noise_loss(pred, t, seed=SEED, validate=False)
            loss.backward()
            return z, loss

        units = FUSED_LOSS
    else:
        sqrt_ac = schedule.table("sqrt_alphas_cumprod")
        sqrt_1m_ac = schedule.table("sqrt_one_minus_alphas_cumprod")

        def fn():
            pred.grad = None
            z, eps = eager_q_sample(x, t, sqrt_ac, sqrt_1m_ac)
            loss = F.mse_loss(pred, eps)
            loss.backward()
            return z, loss

        units = EAGER_LOSS
    z, loss = measure(
        fn,
        group=case.group("loss_fwd_bwd"),
        side=_side(case, impl),
        bytes_moved=units * case.numel * case.itemsize,
        **_info(case, impl, backend),
    )
    assert z.shape == x.shape and loss.dim() == 0
    assert pred.grad is not None and pred.grad.shape == pred.shape


def test_reverse_step(benchmark, measure, case, impl, schedule):
    z = case.tensor()
    pred = case.tensor()
    t = _t(case, schedule)
    backend = _check_backend(case, z)
    if impl == "fastdiff":

        def fn():
            return ops.reverse_step(z, pred, t, schedule, seed=SEED, validate=False)

        units = FUSED_REVERSE
    else:
        betas = schedule.table("betas")
        alphas_cumprod = schedule.table("alphas_cumprod")
        sigma = schedule.table("sigma_beta")

        def fn():
            return eager_reverse_step(z, pred, t, betas, alphas_cumprod, sigma)

        units = EAGER_REVERSE
    out = measure(
        fn,
        group=case.group("reverse_step"),
        side=_side(case, impl),
        bytes_moved=units * case.numel * case.itemsize,
        **_info(case, impl, backend),
    )
    assert out.shape == z.shape and out.dtype == z.dtype


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_sampler_step(benchmark, measure, case, impl, schedule, sampler):
    """One sampler update (the model call excluded): DDIM (eta = 0) beside DPM-Solver++ 2M."""
    z, pred = case.tensor(), case.tensor()
    t = _t(case, schedule)
    backend = _check_backend(case, z)
    fused, eager, fused_units, eager_units = _sampler_step_sides(sampler, z, pred, t, schedule)
    out = measure(
        fused if impl == "fastdiff" else eager,
        group=case.group(f"{sampler}_step"),
        side=_side(case, impl),
        bytes_moved=(fused_units if impl == "fastdiff" else eager_units) * case.numel
        * case.itemsize,
        **_info(case, impl, backend),
    )  # fmt: skip
    assert out.shape == z.shape and out.dtype == z.dtype


# -- CUDA: device time by graph replay -------------------------------------------------------


def graph_device_time(fn) -> float:
    """Seconds of GPU time per call of fn: REPS calls captured as one CUDA graph (after 3
    warm-up calls on a side stream), replayed REPLAYS times between two CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / (REPLAYS * REPS)
    graph.reset()
    return seconds


def host_overhead(fn) -> float:
    """Seconds of host time per eager call: REPS calls issued without synchronising (the GPU
    queue absorbs them), after a synchronisation."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(REPS):
        fn()
    seconds = (time.perf_counter() - t0) / REPS
    torch.cuda.synchronize()
    return seconds


_COPY_GBPS: dict[int, float] = {}


def copy_gbps(nbytes: int) -> float:
    """GB/s of a device copy_ that reads nbytes / 2 and writes nbytes / 2 (cached per size)."""
    if nbytes not in _COPY_GBPS:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        _COPY_GBPS[nbytes] = nbytes / graph_device_time(lambda: dst.copy_(src)) / 1e9
    return _COPY_GBPS[nbytes]


#: The DRAM-bound reference: a copy_ of 1 GiB into another 1 GiB buffer (2 GiB moved).
COPY_1GIB_BYTES = 2 * 2**30


def copy_1gib_gbps() -> float:
    """GB/s of a 1 GiB device-to-device copy_ (copy_gbps, cached: measured once per session;
    the two buffers are freed after it)."""
    if COPY_1GIB_BYTES not in _COPY_GBPS:
        copy_gbps(COPY_1GIB_BYTES)
        torch.cuda.empty_cache()
    return _COPY_GBPS[COPY_1GIB_BYTES]


_ROWS: list[dict] = []


@pytest.fixture(scope="module")
def device_table(request):
    """Collects one row per (op, case, side); printed as a table when the module finishes."""
    yield _ROWS
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if not _ROWS or reporter is None:
        return
    reporter.section("device time per call (CUDA-graph replay, CUDA events)")
    if COPY_1GIB_BYTES in _COPY_GBPS:
        reporter.write_line(
            f"% copy: of a copy of the same bytes (same buffers, replayed); % 1GiB: of a 1 GiB"
            f" copy ({_COPY_GBPS[COPY_1GIB_BYTES]:.0f} GB/s)"
        )
    reporter.write_line(
        f"{'op':<22}{'case':<34}{'side':<10}{'device us':>10}{'GB/s':>9}{'% copy':>8}"
        f"{'% 1GiB':>8}{'host us':>9}{'speedup':>9}"
    )
    for r in _ROWS:
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        reporter.write_line(
            f"{r['op']:<22}{r['case']:<34}{r['side']:<10}{r['device_us']:>10.1f}"
            f"{r['gb_per_s']:>9.0f}{r['pct_of_copy']:>8.0f}{r['pct_of_1gib_copy']:>8.0f}"
            f"{r['host_us']:>9.1f}{speed:>9}"
        )


def _record(benchmark, table, op, case_id, sides: dict, nbytes: int):
    """Times each side (device, host), fills extra_info and the table; pytest-benchmark then
    times the fastdiff side's graph of REPS calls replayed (host wall clock)."""
    # Strict: the "fastdiff" side must be the kernels, never the torch reference (which
    # default dispatch would pick, e.g., where triton cannot be imported).
    assert ops.backend_on(DEVICE) == "triton", "fastdiff's ops would not run the Triton kernels"
    copy_rate = copy_gbps(nbytes)
    copy_1gib = copy_1gib_gbps()
    rows = {}
    for side, fn in sides.items():
        device = graph_device_time(fn)
        rows[side] = {
            "op": op, "case": case_id, "side": side, "device_us": device * 1e6,
            "gb_per_s": nbytes / device / 1e9, "host_us": host_overhead(fn) * 1e6,
        }  # fmt: skip
        rows[side]["pct_of_copy"] = 100 * rows[side]["gb_per_s"] / copy_rate
        rows[side]["pct_of_1gib_copy"] = 100 * rows[side]["gb_per_s"] / copy_1gib
    if "eager" in rows:
        rows["fastdiff"]["speedup"] = rows["eager"]["device_us"] / rows["fastdiff"]["device_us"]
    table.extend(rows.values())
    benchmark.group = f"{op} {case_id}"
    # fastdiff's figures unprefixed (what benchmarks/gpu_check.py tabulates), eager's prefixed
    figures = {k: round(v, 2) for k, v in rows["fastdiff"].items() if isinstance(v, float)}
    figures["speedup_vs_eager"] = figures.pop("speedup", None)
    benchmark.extra_info.update(
        op=op, case=case_id, bytes_moved=nbytes, copy_gb_per_s=round(copy_rate, 1),
        copy_1gib_gbps=round(copy_1gib, 1), **figures,
        **{f"eager_{k}": round(v, 2) for k, v in rows.get("eager", {}).items()
           if isinstance(v, float)},
    )  # fmt: skip
    benchmark.pedantic(_replay(sides["fastdiff"]), rounds=5, warmup_rounds=1, iterations=1)
    return rows


def _replay(fn):
    """A host-timed replay of REPS calls of fn (for pytest-benchmark's own statistics); fn
    has been warmed up by graph_device_time already."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()

    def run():
        graph.replay()
        torch.cuda.synchronize()

    return run


DEVICE_CASES = [
    (shape, dtype, layout)
    for shape in ((128, 3, 32, 32), (64, 3, 256, 256), (256, 4, 64, 64))
    for dtype in (torch.bfloat16, torch.float32)
    for layout in ("channels_last", "contiguous")
    if layout == "channels_last" or shape == (64, 3, 256, 256)
]
NOISE_OPS = ("q_sample", "noise_loss_fwd", "noise_loss_fwd_bwd", "reverse_step")


def _case_id(shape, dtype, layout) -> str:
    """e.g. cuda-64x3x256x256-bf16-cl (the "cuda" lets ``-k cuda`` select the device cases)."""
    dt = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
    lay = "cl" if layout == "channels_last" else "nchw"
    return f"cuda-{'x'.join(map(str, shape))}-{dt}-{lay}"


def _noise_sides(op, shape, dtype, layout, schedule):
    """(fastdiff fn, eager fn, bytes) of one noise op on tensors of the case."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def tensor(grad=False):
        x = torch.randn(shape, device=DEVICE, generator=gen).to(dtype, memory_format=fmt)
        return x.requires_grad_(grad)

    x, z, pred, pred_g = tensor(), tensor(), tensor(), tensor(grad=True)
    t = torch.randint(0, schedule.T, (shape[0],), device=DEVICE, generator=gen)
    seed = torch.tensor([SEED], device=DEVICE)
    n_bytes = x.numel() * x.element_size()
    sac = schedule.table("sqrt_alphas_cumprod")
    s1m = schedule.table("sqrt_one_minus_alphas_cumprod")
    if op == "q_sample":
        return (
            lambda: ops.q_sample(x, t, schedule, seed=seed, validate=False),
            lambda: eager_q_sample(x, t, sac, s1m)[0],
            2 * n_bytes,
        )
    if op == "noise_loss_fwd":
        return (
            lambda: ops.noise_loss(pred, t, seed=seed, validate=False),
            lambda: F.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32)),
            n_bytes,
        )
    if op == "noise_loss_fwd_bwd":
        fused_loss = lambda: ops.noise_loss(pred_g, t, seed=seed, validate=False)  # noqa: E731
        eager_loss = lambda: F.mse_loss(  # noqa: E731
            pred_g.float(), torch.randn_like(pred_g, dtype=torch.float32)
        )
        return (
            lambda: torch.autograd.grad(fused_loss(), pred_g),
            lambda: torch.autograd.grad(eager_loss(), pred_g),
            3 * n_bytes,
        )
    betas, ac, sigma = (schedule.table(n) for n in ("betas", "alphas_cumprod", "sigma_beta"))
    return (
        lambda: ops.reverse_step(z, pred, t, schedule, seed=seed, validate=False),
        lambda: eager_reverse_step(z, pred, t, betas, ac, sigma),
        3 * n_bytes,
    )


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("op", NOISE_OPS)
@pytest.mark.parametrize(
    "shape,dtype,layout", DEVICE_CASES, ids=[_case_id(*c) for c in DEVICE_CASES]
)
def test_device_time_noise_ops(benchmark, device_table, op, shape, dtype, layout):
    schedule = NoiseSchedule.linear(1000).to(DEVICE)
    fused, eager, nbytes = _noise_sides(op, shape, dtype, layout, schedule)
    rows = _record(
        benchmark, device_table, op, _case_id(shape, dtype, layout),
        {"fastdiff": fused, "eager": eager}, nbytes,
    )  # fmt: skip
    assert rows["fastdiff"]["device_us"] > 0


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
@pytest.mark.parametrize(
    "shape,dtype,layout", DEVICE_CASES, ids=[_case_id(*c) for c in DEVICE_CASES]
)
def test_device_time_sampler_steps(benchmark, device_table, sampler, shape, dtype, layout):
    """The fused ddim_step and dpm_solver_step kernels, each against its eager formula, on
    the noise ops' shapes."""
    schedule = NoiseSchedule.linear(1000).to(DEVICE)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    z, pred = (
        torch.randn(shape, device=DEVICE, generator=gen).to(dtype, memory_format=fmt)
        for _ in range(2)
    )
    t = torch.randint(20, schedule.T, (shape[0],), device=DEVICE, generator=gen)
    fused, eager, units, _ = _sampler_step_sides(sampler, z, pred, t, schedule)
    rows = _record(
        benchmark, device_table, f"{sampler}_step", _case_id(shape, dtype, layout),
        {"fastdiff": fused, "eager": eager}, units * z.numel() * z.element_size(),
    )  # fmt: skip
    assert rows["fastdiff"]["device_us"] > 0


GN_CASES = [
    (shape, groups, dtype)
    for shape, groups in (((128, 128, 32, 32), 32), ((128, 256, 16, 16), 32),
                          ((128, 384, 16, 16), 32))
    for dtype in (torch.bfloat16, torch.float32)
]  # fmt: skip


def _group_norm_case(benchmark, device_table, op, shape, groups, dtype, backward, scale_shift):
    """Time fastdiff's fused NHWC GroupNorm+SiLU against torch's GroupNorm then SiLU
    (channels_last), with (scale_shift) the per-sample modulation silu(GN(x) (1 + scale) +
    shift) on both sides; gradients w.r.t. every input when backward."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=gen).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(backward)
    n, c = shape[:2]
    w, b = (torch.randn(c, device=DEVICE, generator=gen).requires_grad_(backward) for _ in "wb")
    mod = {}
    if scale_shift:  # the ResBlock's temb_proj output: activation dtype under autocast
        mod = {
            k: (0.5 * torch.randn(n, c, device=DEVICE, generator=gen)).to(dtype)
            for k in ("scale", "shift")
        }
        for v in mod.values():
            v.requires_grad_(backward)
    dout = torch.randn_like(x)
    assert ops.group_norm_backend(x) == "triton"

    def torch_side():
        y = F.group_norm(x, groups, w.to(dtype), b.to(dtype), 1e-5)
        if scale_shift:
            y = y * (1 + mod["scale"][..., None, None]) + mod["shift"][..., None, None]
        return F.silu(y)

    def fused_side():
        return ops.group_norm_silu(x, groups, w, b, validate=False, **mod)

    sides = {"fastdiff": fused_side, "eager": torch_side}
    if backward:
        inputs = (x, w, b, *mod.values())
        sides = {
            name: (lambda f=f: torch.autograd.grad(f(), inputs, dout)) for name, f in sides.items()
        }
    nbytes = (5 if backward else 2) * x.numel() * x.element_size()
    op += "_fwd_bwd" if backward else "_fwd"
    case_id = f"{_case_id(shape, dtype, 'channels_last')}-G{groups}"
    rows = _record(benchmark, device_table, op, case_id, sides, nbytes)
    assert rows["fastdiff"]["device_us"] > 0


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize(
    "shape,groups,dtype",
    GN_CASES,
    ids=[f"{_case_id(s, d, 'channels_last')}-G{g}" for s, g, d in GN_CASES],
)
def test_device_time_group_norm_silu(benchmark, device_table, shape, groups, dtype, backward):
    """fastdiff's fused NHWC GroupNorm+SiLU vs torch's GroupNorm then SiLU, channels_last."""
    _group_norm_case(
        benchmark, device_table, "group_norm_silu", shape, groups, dtype, backward, False
    )


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_device_time_group_norm_silu_scale_shift(benchmark, device_table, backward):
    """The scale-shift ResBlock's norm (UNet(scale_shift_norm=True)): the fused kernels with
    the folded per-sample affine vs torch's GroupNorm, multiply-add, SiLU (bf16, 256 ch)."""
    shape, groups, dtype = (128, 256, 16, 16), 32, torch.bfloat16
    _group_norm_case(
        benchmark, device_table, "group_norm_silu_scale_shift", shape, groups, dtype, backward,
        True,
    )  # fmt: skip
