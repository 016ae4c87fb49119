"""The learning-rate schedule: linear warm-up, then constant or cosine decay to 0 at ``steps``."""

import math
import os
import signal
import types

import pytest
import torch

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
