"""The learning-rate schedule: linear warm-up, then constant or cosine decay to 0 at ``steps``."""

import math
import os
import signal
import types

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fastdiff import TrainingInterrupted, train, train_graph
from fastdiff.training import TrainConfig, _Run


def lr_at(**cfg):
    run = types.SimpleNamespace(cfg=TrainConfig(batch_size=1, **cfg))
    return lambda k: _Run.lr_at(run, k)


def test_cosine_decay_in_closed_form():
    lr = lr_at(steps=1200, lr=2e-3, warmup_steps=200, lr_schedule="cosine")
    assert lr(0) == pytest.approx(2e-3 / 200)  # warm-up as before
    assert lr(199) == lr(200) == 2e-3  # warm-up done, decay not started
    assert lr(700) == pytest.approx(1e-3)  # half way through the decay: lr / 2
    for k in (300, 450, 950):
        want = 2e-3 * 0.5 * (1 + math.cos(math.pi * (k - 200) / 1000))
        assert lr(k) == pytest.approx(want, rel=1e-12)
    assert lr(1199) == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 999 / 1000)))
    assert lr(1200) == lr(5000) == 0.0  # resumed past `steps`: stays at 0
    values = [lr(k) for k in range(200, 1201)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    constant = lr_at(steps=1200, lr=2e-3, warmup_steps=200)
    assert constant(199) == constant(1199) == 2e-3


@pytest.mark.parametrize("warmup,steps", [(0, 10), (7, 100), (500, 3000), (10, 10)])
def test_device_cosine_schedule_is_the_eager_one_bit_for_bit(warmup, steps):
    cfg = TrainConfig(steps=steps, batch_size=1, lr=3e-4, warmup_steps=warmup, lr_schedule="cosine")
    ks = [0, 1, warmup, warmup + 1, steps // 2, steps - 1, steps, 10**9]
    run = types.SimpleNamespace(cfg=cfg)
    want = torch.tensor([_Run.lr_at(run, k) for k in ks], dtype=torch.float64)
    got = train_graph.lr_schedule(torch.tensor(ks), cfg.lr, warmup, "cosine", steps)
    assert torch.equal(got, want)


def test_training_logs_the_cosine_lr(tmp_path):
    records = []
    kw = dict(preset="tiny", batch_size=4, T=20, device="cpu", progress=False, log_every=2)
    data = torch.rand(8, 1, 8, 8) * 2 - 1
    train(data, steps=8, lr=1e-3, warmup_steps=2, lr_schedule="cosine", on_log=records.append, **kw)
    logged = [r["lr"] for r in records]
    # Logged at steps 2, 4, 6, 8: the lr of steps 1, 3, 5, 7 (0-based); step 1 ends the warm-up.
    want = [1e-3 * 0.5 * (1 + math.cos(math.pi * max(k - 2, 0) / 6)) for k in (1, 3, 5, 7)]
    assert logged == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        train(data, steps=8, lr_schedule="linear", out_dir=tmp_path / "bad", **kw)
    assert not (tmp_path / "bad").exists()


def test_a_stopped_cosine_run_resumed_with_the_same_steps_is_bitwise_a_straight_one(tmp_path):
    """SIGTERM at step 3 of 8 (delivered in-process by the logging callback), then resume to
    8: the decay keeps its horizon, so the weights equal an uninterrupted cosine run's."""
    data = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(preset="tiny", batch_size=4, T=20, device="cpu", progress=False, log_every=1,
              steps=8, lr=1e-3, warmup_steps=2, lr_schedule="cosine", precision="fp32")  # fmt: skip

    def stop_at_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stopped:
        train(data, out_dir=tmp_path / "run", on_log=stop_at_3, **kw)
    assert stopped.value.step == 3
    resumed = train(data, out_dir=tmp_path / "run", resume=True, **kw)
    straight = train(data, out_dir=tmp_path / "straight", **kw)
    for a, b in ((resumed.model, straight.model), (resumed.ema_model, straight.ema_model)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name


# -- against the closed form, written plainly (not through lr_schedule) ----------------------


def closed_form_lr(k: int, lr: float, warmup: int, schedule: str, steps: int) -> float:
    """The documented schedule in Python floats: lr * min(1, (k + 1) / warmup) (lr when
    warmup is 0), times 0.5 (1 + cos(pi clamp((k - warmup) / max(steps - warmup, 1), 0, 1)))
    for cosine."""
    rate = lr if warmup == 0 else lr * min(1.0, (k + 1) / warmup)
    if schedule == "cosine":
        progress = min(max((k - warmup) / max(steps - warmup, 1), 0.0), 1.0)
        rate = rate * (0.5 * (1.0 + math.cos(math.pi * progress)))
    return rate


def test_closed_form_itself_at_hand_computed_points():
    """The reference formula above, pinned by values worked out by hand."""
    assert closed_form_lr(0, 0.5, 0, "constant", 10) == 0.5  # no warm-up: the full lr at once
    assert closed_form_lr(0, 0.5, 1, "constant", 10) == 0.5  # one warm-up step: (0 + 1) / 1
    assert closed_form_lr(0, 0.7, 7, "constant", 10) == pytest.approx(0.1, rel=1e-15)
    assert closed_form_lr(6, 0.7, 7, "constant", 10) == 0.7
    assert closed_form_lr(0, 0.5, 0, "cosine", 10) == 0.5  # cos(0) = 1
    assert closed_form_lr(5, 0.5, 0, "cosine", 10) == pytest.approx(0.25, rel=1e-15)  # half way
    assert closed_form_lr(9, 0.5, 0, "cosine", 10) == pytest.approx(
        0.25 * (1 - math.cos(math.pi / 10)), rel=1e-15
    )
    assert closed_form_lr(10, 0.5, 0, "cosine", 10) == 0.0  # the end
    assert closed_form_lr(3, 0.8, 4, "cosine", 4) == 0.8  # warmup == steps: no decay in range


#: 0-based steps to check for a schedule with ``warmup`` warm-up steps and ``steps`` in all:
#: the first two, both sides of the end of the warm-up, the middle, the last step, the step
#: past the end and far past it (a run resumed with a larger step count).
def _steps_to_check(warmup: int, steps: int) -> list[int]:
    ks = {0, 1, warmup - 1, warmup, warmup + 1, steps // 2, steps - 2, steps - 1, steps}
    return sorted(k for k in ks | {steps + 1, steps + 13, 10**9} if k >= 0)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 7])
@pytest.mark.parametrize("steps", [7, 10, 1000])
def test_lr_schedule_and_lr_at_equal_the_closed_form(schedule, warmup, steps):
    """train_graph.lr_schedule (the device formula, float64) and _Run.lr_at (the eager step's
    lr) against closed_form_lr.  Constant: the same float64 operations in the same order, so
    exactly equal.  Cosine: torch.cos against math.cos may differ in the last bit, so
    relative 1e-12 (float64)."""
    lr = 3e-4
    ks = _steps_to_check(warmup, steps)
    want = [closed_form_lr(k, lr, warmup, schedule, steps) for k in ks]
    device = train_graph.lr_schedule(torch.tensor(ks), lr, warmup, schedule, steps)
    assert device.dtype == torch.float64 and device.shape == (len(ks),)
    eager = lr_at(steps=steps, lr=lr, warmup_steps=warmup, lr_schedule=schedule)
    for k, w, d in zip(ks, want, device.tolist(), strict=True):
        e = eager(k)
        assert isinstance(e, float)
        if schedule == "constant":
            assert d == w and e == w, (k, d, e, w)
        else:
            assert d == pytest.approx(w, rel=1e-12, abs=0.0), (k, d, w)
            assert e == pytest.approx(w, rel=1e-12, abs=0.0), (k, e, w)
    if warmup <= 1:  # no warm-up to speak of: step 0 trains at the full lr
        assert device[0] == lr and eager(0) == lr
    if schedule == "cosine":
        end = max(steps, warmup + 1)  # decayed to 0 at the end (one step after a warm-up
        assert eager(end) == eager(10**9) == 0.0  # as long as the run), and stays there
    else:
        assert eager(steps - 1) == eager(10**9) == lr


class _OptimizerLrs:
    """Records the lr every AdamW step of the process actually runs with (a global optimizer
    step pre-hook): param_groups[0]["lr"] as it is when optimizer.step() starts (a float
    for the eager step, a copy of the fp32 lr tensor for the device step)."""

    def __init__(self):
        self.values: list = []

    def __enter__(self):
        def hook(optimizer, args, kwargs):
            if isinstance(optimizer, torch.optim.AdamW):
                lr = optimizer.param_groups[0]["lr"]
                # The device step's lr is one tensor rewritten in place: keep a copy.
                self.values.append(lr.clone() if isinstance(lr, torch.Tensor) else lr)

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class _Conv(torch.nn.Module):
    """Any forward(z, t) model trains; one conv keeps these runs quick."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, z, t):
        return self.conv(z)


@pytest.mark.parametrize("path", ["eager", "device_step"])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_training_optimizer_gets_the_closed_form_lr(monkeypatch, path, schedule, warmup):
    """What AdamW really runs with at each step of fastdiff.train, against the closed form.

    eager: the eager step writes a Python float, so it must equal the float64 closed form
    (exactly for constant, rel 1e-12 for cosine).  device_step: train_graph's step function
    (the one captured on CUDA, run eagerly on CPU here) writes lr_schedule into an fp32 lr
    tensor, so the optimizer sees the closed form rounded to fp32: within half an fp32 ulp
    (relative 2**-24; for constant exactly the fp32 rounding of the closed form).  The logged
    lr (on_log, every step) is the closed form of the step just taken."""
    if path == "device_step":
        monkeypatch.setattr(train_graph, "graph_enabled", lambda *args, **kwargs: True)
    steps, lr = 8, 1e-3
    data = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    records = []
    with _OptimizerLrs() as seen:
        train(data, _Conv(), steps=steps, batch_size=4, T=10, lr=lr, warmup_steps=warmup,
              lr_schedule=schedule, precision="fp32", device="cpu", progress=False,
              log_every=1, on_log=records.append)  # fmt: skip
    want = [closed_form_lr(k, lr, warmup, schedule, steps) for k in range(steps)]
    assert len(seen.values) == steps
    if path == "eager":
        assert all(isinstance(v, float) for v in seen.values), seen.values
        got = seen.values
        if schedule == "constant":
            assert got == want
        else:
            assert got == pytest.approx(want, rel=1e-12, abs=0.0)
    else:
        assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in seen.values)
        got = [float(v) for v in seen.values]
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            assert abs(g - w) <= 2.0**-24 * abs(w) * (1 + 1e-9), (k, g, w)
            if schedule == "constant":
                assert g == float(torch.tensor(w, dtype=torch.float32)), (k, g, w)
    if warmup == 0:
        assert got[0] == pytest.approx(lr, rel=2.0**-24)  # step 0 at the full lr
    else:
        assert got[0] == pytest.approx(lr / warmup, rel=2.0**-24)
    logged = [r["lr"] for r in records]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert logged == pytest.approx(want, rel=1e-12, abs=0.0)
