"""Where a training or sampling step's time goes: kernels per step, device and host time.

    python benchmarks/gpu_profile.py [--smoke] [--steps N] [--only NAME[,NAME]]

For each case (the cifar10 preset's training step at batch 128, bf16 channels_last, as one
CUDA graph and eagerly; the default job's digits step at batch 64 as a graph; one
cifar10 sampling step at n = 256 from the captured sampler) it prints one JSON line:

* ``host_ms_per_step``: the time the host takes to issue N steps, divided by N, with no
  synchronisation inside (the GPU runs behind; what a training loop pays per step on the CPU);
* ``wall_ms_per_step``: N steps issued then synchronised, divided by N;
* ``kernels_per_step`` and ``device_ms_per_step``: from torch.profiler over N more steps, the
  number of device kernels and the sum of their durations, divided by N;
* ``top``: the kernels with the largest device time per step (name truncated, ms per step,
  calls per step).

Reading it: device above wall means the trace is wrong (profiling replayed CUDA graphs has
had CUPTI bugs; gpu_check marks such rows "device > wall?"); wall ~ device means the GPU is
the limit (look at ``top``); wall ~ host with device well below means the step is host-bound
(the graph is meant to remove that); kernels per step against the eager case says how much
the graph and the fused kernels merged.
``--smoke`` runs small cases on the CPU (how tests/test_gpu_check.py checks this script):
there is no device time, so the kernel figures are 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_train_sample import SEED, Case, _fastdiff_run  # noqa: E402

from fastdiff import NoiseSchedule  # noqa: E402
from fastdiff.low_precision import sampling_model  # noqa: E402
from fastdiff.precision import memory_format, resolve_precision  # noqa: E402
from fastdiff.sampling import Sampler, run_sampler  # noqa: E402
from fastdiff.training import model_for_data  # noqa: E402

#: name -> (what, Case); ``what`` is "train" or "sample" (one sampling step of a T=20 run).
CUDA_CASES = {
    "train-cifar10-graph": ("train", Case("cuda", "cifar10", (3, 32, 32), 128, "fastdiff_graph",
                                          "bf16", True, 0, 0)),
    "train-cifar10-eager": ("train", Case("cuda", "cifar10", (3, 32, 32), 128, "fastdiff_eager",
                                          "bf16", True, 0, 0)),
    "train-digits-graph": ("train", Case("cuda", "digits", (1, 16, 16), 64, "fastdiff_graph",
                                         "bf16", True, 0, 0)),
    "sample-cifar10-n256-graph": ("sample", Case("cuda", "cifar10", (3, 32, 32), 256,
                                                 "fastdiff_graph", "bf16", True, 0, 0)),
}  # fmt: skip
SMOKE_CASES = {
    "train-tiny": ("train", Case("cpu", "tiny", (1, 8, 8), 4, "fastdiff", "fp32", False, 0, 0)),
    "sample-tiny": ("sample", Case("cpu", "tiny", (1, 8, 8), 4, "fastdiff_eager", "fp32", False,
                                   0, 0)),
}  # fmt: skip
SAMPLE_T = 20
#: Calls before anything is measured: a training graph is captured after 3 eager steps.
WARMUP = 5
TOP = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(case: Case) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return model_for_data(case.image_shape, case.preset)


def train_step_fn(case: Case):
    """One training step of the run fastdiff.train builds (graph or eager per ``case.impl``);
    a graph case whose capture failed raises instead of profiling the eager fallback."""
    g = torch.Generator().manual_seed(SEED)
    data = torch.rand(256, *case.image_shape, generator=g) * 2 - 1
    run = _fastdiff_run(case, _model(case), data)
    calls = 0

    def fn():
        nonlocal calls
        run.train_step()
        calls += 1
        if (
            case.impl == "fastdiff_graph" and calls >= WARMUP
        ):  # captured by now (3 eager steps first)
            if run.graph_step is None or run.graph_step.graph is None:
                raise RuntimeError(f"{case.id}: the training step was not captured")

    return fn


def sample_step_fn(case: Case):
    """A whole T=SAMPLE_T sampling run (what ``sample()`` runs: the bf16 copy, captured step);
    the figures are divided by SAMPLE_T, so they are per denoising step."""
    dev = torch.device(case.device)
    prec = resolve_precision(case.precision, dev)
    schedule = NoiseSchedule.linear(SAMPLE_T).to(dev)
    model = _model(case).to(dev, memory_format=memory_format(case.channels_last))
    model.eval().requires_grad_(False)
    copy = sampling_model(model, prec, dev, case.channels_last)
    sampler = Sampler(copy, schedule, precision=prec, channels_last=case.channels_last)
    graph = case.impl == "fastdiff_graph"

    def fn():
        return run_sampler(sampler, case.batch, case.image_shape, dev, seed=SEED,
                           batch_size=case.batch, cuda_graph=graph, strict=graph)  # fmt: skip

    return fn


def kernel_table(events, calls: int) -> tuple[int, float, list[dict]]:
    """(kernels per call, device ms per call, the TOP kernels by device time) from the
    profiler's events: every event that ran on a CUDA device (kernels, copies, memsets), but
    not the device-side copies of user annotations."""
    per_name: dict[str, list[float]] = {}
    for e in events:
        # A CUDA-side event that is a user annotation (e.g. the optimizer's record_function
        # "Optimizer.step#AdamW.step") spans kernels: counting it would count them twice.
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            per_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    count = sum(len(v) for v in per_name.values())
    total_us = sum(sum(v) for v in per_name.values())
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:TOP]
    rows = [
        {"kernel": name[:80], "ms_per_step": round(sum(us) / calls / 1e3, 4),
         "calls_per_step": round(len(us) / calls, 2)}
        for name, us in top
    ]  # fmt: skip
    return round(count / calls, 1), total_us / calls / 1e3, rows


def profile_case(name: str, what: str, case: Case, steps: int) -> dict:
    dev = torch.device(case.device)
    fn = train_step_fn(case) if what == "train" else sample_step_fn(case)
    per_call = 1 if what == "train" else SAMPLE_T  # denoising steps per call
    for _ in range(WARMUP):  # Triton compilation, the graph's eager steps and capture
        fn()
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    host = time.perf_counter() - start
    _sync(dev)
    wall = time.perf_counter() - start
    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(dev)
    n = steps * per_call
    kernels, device_ms, top = kernel_table(prof.events(), n)
    if dev.type == "cuda" and kernels == 0:  # no device trace (e.g. CUPTI missed the replays)
        raise RuntimeError("the profiler recorded no device events: no kernel figures")
    return {
        "case": name, "what": what, "preset": case.preset, "batch": case.batch,
        "impl": case.impl, "precision": case.precision, "steps": n,
        "host_ms_per_step": round(host / n * 1e3, 4), "wall_ms_per_step": round(wall / n * 1e3, 4),
        "kernels_per_step": kernels, "device_ms_per_step": round(device_ms, 4), "top": top,
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small CPU cases")
    p.add_argument("--steps", type=int, default=None, help="steps per measurement [10; smoke 2]")
    p.add_argument("--only", default=None, help="comma-separated case names")
    args = p.parse_args(argv)
    cases = SMOKE_CASES if args.smoke else CUDA_CASES
    if args.only:
        unknown = set(args.only.split(",")) - set(cases)
        if unknown:
            p.error(f"--only: unknown case(s) {sorted(unknown)}; known: {sorted(cases)}")
        cases = {k: v for k, v in cases.items() if k in args.only.split(",")}
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_profile: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 1
    steps = args.steps or (2 if args.smoke else 10)
    failed = False
    for name, (what, case) in cases.items():
        try:
            row = profile_case(name, what, case, steps)
        except Exception as exc:  # one case failing must not hide the others' figures
            failed = True
            row = {"case": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
