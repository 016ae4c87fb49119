"""Shared set-up of the op benchmarks (``pytest benchmarks/ --benchmark-only``).

Nothing here touches TRITON_INTERPRET or FASTDIFF_BACKEND: every op takes its default dispatch,
i.e. the Triton kernels on CUDA tensors and the torch reference on CPU tensors (what a fastdiff
user on that device gets).  The Triton interpreter is a correctness tool, not a performance
path, and is never benchmarked.

Strict: ``FASTDIFF_STRICT`` defaults to 1 here, so a CUDA case whose graph cannot be captured
fails instead of silently timing the eager fallback (fastdiff.cuda_graphs).

Cases and ids.  A test that takes the fixtures ``case`` and ``impl`` runs for every case in
CASES crossed with the two sides of the comparison: ``fastdiff_<backend>`` (the backend that
default dispatch picks on that device: ``reference`` on CPU, ``triton`` on CUDA) and ``eager``
(the same math written the usual way in eager PyTorch).  A test that takes ``cuda_case`` runs
for the CUDA cases only.  CUDA cases are skipped when no CUDA device is present.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from fastdiff import NoiseSchedule
from fastdiff.cuda_graphs import STRICT_ENV

os.environ.setdefault(STRICT_ENV, "1")  # a benchmark never times an eager fallback

NO_CUDA_REASON = "CUDA is not available: the CUDA benchmark cases need a GPU"


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # "contiguous" or "channels_last"

    @property
    def backend(self) -> str:
        """The backend fastdiff.ops picks for this case under default dispatch."""
        return "triton" if self.device == "cuda" else "reference"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
        return f"{self.device}-{'x'.join(map(str, self.shape))}-{dt}-{self.layout}"

    def group(self, op: str) -> str:
        return f"{op} {self.id}"

    def tensor(self, *, requires_grad: bool = False, generator=None) -> torch.Tensor:
        """Standard-normal data of this case's shape, dtype, device and memory layout."""
        fmt = torch.channels_last if self.layout == "channels_last" else torch.contiguous_format
        x = torch.randn(self.shape, generator=generator).to(
            device=self.device, dtype=self.dtype, memory_format=fmt
        )
        return x.requires_grad_(requires_grad)

    def info(self) -> dict:
        return {
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "layout": self.layout,
            "device": self.device,
        }


#: Host-timed cases: CPU only, small (each round a few ms on 2 cores).  On CUDA the ops are
#: timed by device time instead (test_bench_ops.py: test_device_time_*), where host-timed
#: rounds would measure launch overhead rather than the kernels.
CASES = (Case("cpu", (64, 1, 16, 16), torch.float32, "contiguous"),)
IMPLS = ("fastdiff", "eager")


def _marks(case: Case):
    if case.device == "cuda":
        return [pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)]
    return []


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and "impl" in metafunc.fixturenames:
        params = []
        for case in CASES:
            for impl in IMPLS:
                side = f"fastdiff_{case.backend}" if impl == "fastdiff" else impl
                params.append(pytest.param(case, impl, id=f"{case.id}-{side}", marks=_marks(case)))
        metafunc.parametrize("case,impl", params)
    if "cuda_case" in metafunc.fixturenames:
        params = [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES if c.device == "cuda"]
        metafunc.parametrize("cuda_case", params)


_SCHEDULES: dict[str, NoiseSchedule] = {}


def schedule_on(device: str) -> NoiseSchedule:
    """The linear T=1000 schedule of Ho et al., built once per device."""
    if device not in _SCHEDULES:
        _SCHEDULES[device] = NoiseSchedule.linear(1000).to(device)
    return _SCHEDULES[device]


@pytest.fixture
def schedule(request) -> NoiseSchedule:
    """A NoiseSchedule on the device of the test's case (``case`` or ``cuda_case``)."""
    names = request.fixturenames
    case = request.getfixturevalue("case" if "case" in names else "cuda_case")
    return schedule_on(case.device)


def synchronizing(fn, device: str):
    """fn, followed by a device sync on CUDA so the timer sees the kernels finish."""
    if device != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def median_seconds(benchmark) -> float | None:
    """The median round time in seconds, or None when there are no timings.

    With ``--benchmark-disable`` the fixture runs the function once and ``benchmark.stats``
    stays None; ``benchmark.stats`` is a Metadata whose ``["median"]`` reads Stats.median.
    """
    stats = getattr(benchmark, "stats", None)
    if not stats:  # None, or no rounds recorded
        return None
    try:
        median = stats["median"]
    except (AttributeError, KeyError, ValueError, ZeroDivisionError):
        return None
    return float(median) if median and median > 0 else None


_RESULTS: list[dict] = []


@pytest.fixture
def measure(benchmark):
    """``measure(fn, group=, side=, bytes_moved=, device=, **info)`` times fn with pytest-benchmark.

    Sets the group, records ``bytes_moved``, ``device`` and ``info`` in extra_info, adds a
    torch.cuda.synchronize() after fn on CUDA (timings include the kernels), warms fn up first
    (Triton compiles on the first call), and after timing adds ``gb_per_s`` =
    bytes_moved / median (effective bandwidth; guarded: absent under --benchmark-disable).
    """

    def run(fn, *, group: str, side: str, bytes_moved: int, device: str, **info):
        fn = synchronizing(fn, device)
        benchmark.group = group
        info["device"] = device
        benchmark.extra_info.update(info, side=side, bytes_moved=int(bytes_moved))
        if benchmark.enabled:
            for _ in range(3):
                fn()
        result = benchmark(fn)
        median = median_seconds(benchmark)
        if median is not None:
            gbps = bytes_moved / median / 1e9
            benchmark.extra_info["gb_per_s"] = round(gbps, 3)
            _RESULTS.append({"group": group, "side": side, "median": median, "gbps": gbps})
        return result

    return run


def pytest_terminal_summary(terminalreporter):
    _ops_summary(terminalreporter)
    _rounds_summary(terminalreporter)


def _ops_summary(tr):
    """One line per group: each side's median and GB/s, and eager / fastdiff (>1: fastdiff wins)."""
    if not _RESULTS:
        return
    tr.section("fastdiff vs eager (median; GB/s = bytes_moved / median)")
    groups: dict[str, dict[str, dict]] = {}
    for r in _RESULTS:
        groups.setdefault(r["group"], {})[r["side"]] = r
    for group, sides in groups.items():
        parts = [
            f"{side} {r['median'] * 1e3:.3f} ms {r['gbps']:.1f} GB/s" for side, r in sides.items()
        ]
        fused = [r for side, r in sides.items() if side.startswith("fastdiff")]
        if fused and "eager" in sides:
            parts.append(f"eager/fastdiff = {sides['eager']['median'] / fused[0]['median']:.2f}x")
        tr.write_line(f"{group}: " + "; ".join(parts))


_ROUND_RESULTS: list[dict] = []


@pytest.fixture
def measure_rounds(benchmark):
    """``measure_rounds(fn, group=, side=, device=, rounds=, warmup_rounds=, derive=, attrs=,
    **info)`` times slow fn (a training step, a sampling run) with ``benchmark.pedantic``.

    Few rounds (each call may take a fraction of a second on CPU): ``warmup_rounds`` untimed
    calls, then ``rounds`` timed calls of one iteration each; a torch.cuda.synchronize() follows
    fn on CUDA.  extra_info gets ``info``, ``attrs``, ``device``, ``side`` and the 1-minute load
    average when the timing starts (other processes may share the CPU); after timing,
    ``derive(median_seconds)`` (a dict, e.g. images_per_s) is added to extra_info (absent under
    --benchmark-disable, where fn runs once).  ``attrs`` names the compared dimensions (impl,
    precision, layout, ...); the terminal summary prints, per group, the median ratio of every
    two sides that differ in exactly one of them.  Returns fn's result.
    """

    def run(fn, *, group, side, device, rounds, warmup_rounds, derive, attrs, **info):
        fn = synchronizing(fn, device)
        benchmark.group = group
        benchmark.extra_info.update(info, **attrs, device=device, side=side)
        if benchmark.enabled:
            benchmark.extra_info["load_avg_1m"] = round(os.getloadavg()[0], 2)
        result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        median = median_seconds(benchmark)
        if median is not None:
            derived = derive(median)
            benchmark.extra_info.update(derived)
            _ROUND_RESULTS.append(
                {"group": group, "side": side, "attrs": dict(attrs), "median": median,
                 "derived": derived}
            )  # fmt: skip
        return result

    return run


def _fmt_value(key: str, value: float) -> str:
    return f"{key}={value:.4g}"


def _rounds_summary(tr):
    """Per group: each side's median and derived figures, then the ratio of every two sides
    that differ in exactly one attribute (slower median / faster median, and which wins)."""
    if not _ROUND_RESULTS:
        return
    tr.section("train step / sampling (median; ratios of sides differing in one attribute)")
    groups: dict[str, list[dict]] = {}
    for r in _ROUND_RESULTS:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        tr.write_line(f"{group}:")
        for r in rows:
            derived = ", ".join(_fmt_value(k, v) for k, v in r["derived"].items())
            tr.write_line(f"  {r['side']:<40} {r['median'] * 1e3:9.1f} ms  {derived}")
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                diff = [k for k in a["attrs"] if a["attrs"][k] != b["attrs"].get(k)]
                if len(diff) != 1 or set(a["attrs"]) != set(b["attrs"]):
                    continue
                key = diff[0]
                same = " ".join(str(v) for k, v in a["attrs"].items() if k != key)
                fast, slow = (a, b) if a["median"] <= b["median"] else (b, a)
                tr.write_line(
                    f"  {key}: {fast['attrs'][key]} is {slow['median'] / fast['median']:.2f}x"
                    f" faster than {slow['attrs'][key]} ({same})"
                )


#: benchmarks/gpu_check.py sets this to a file that gets one JSON line per benchmark as soon as
#: it has run (pytest-benchmark writes its --benchmark-json only when the session ends, so a
#: part killed at its time limit would otherwise lose every row).
ROWS_ENV = "FASTDIFF_BENCH_ROWS"


#: The outcome of a test's call phase ("passed" / "failed"), stored on the item by
#: pytest_runtest_makereport for the row that pytest_runtest_teardown writes.
CALL_OUTCOME = pytest.StashKey[str]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[CALL_OUTCOME] = report.outcome


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Append {"name", "median" (seconds or null), "extra_info", "outcome"} of the benchmark
    that just ran to $FASTDIFF_BENCH_ROWS (before the fixtures are torn down).

    ``outcome`` is the test's call phase: "passed", or "failed" (an assertion after the
    timing, e.g. a graph that was not replayed, or an error in the timed function: the median
    and extra_info may then be a fallback's or partial, and are no result); "error" when the
    call phase never ran (its set-up failed).  Skipped tests get no row."""
    path = os.environ.get(ROWS_ENV)
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if path and bench is not None and not getattr(bench, "skipped", False):
        row = {
            "name": item.name,
            "median": median_seconds(bench),
            "extra_info": bench.extra_info,
            "outcome": item.stash.get(CALL_OUTCOME, "error"),
        }
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    yield
