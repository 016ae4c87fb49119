"""Progress bars advance once per denoising step (sampling and eval), not once per batch."""

import pytest
import torch
from torch import nn

from fastdiff import Diffusion, NoiseSchedule, elbo
from fastdiff.samplers import runner


class CountingModel(nn.Module):
    """Predicts zero noise and logs each call, so the test can interleave calls and ticks."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, z, t):
        self.log.append("model")
        return torch.zeros_like(z)


class RecordingBar:
    def __init__(self, log: list, total: int):
        self.log, self.total = log, total

    def update(self, n=1):
        self.log.append(("tick", n))

    def close(self):
        self.log.append("close")


@pytest.fixture
def recorded(monkeypatch):
    """(log, diffusion): the bars of sampling and eval record into ``log``."""
    log = []

    def fake_bar(total, **kwargs):
        log.append(("bar", total, kwargs["desc"]))
        return RecordingBar(log, total)

    monkeypatch.setattr(runner, "progress_bar", fake_bar)
    monkeypatch.setattr(elbo, "progress_bar", fake_bar)
    diffusion = Diffusion(CountingModel(log), NoiseSchedule.linear(6), (1, 4, 4))
    return log, diffusion


def _check_one_tick_per_model_call(log, total):
    assert log[0][0] == "bar" and log[0][1] == total
    body = [e for e in log[1:] if e != "close"]
    # model, tick, model, tick, ...: the bar moves after every step, within each batch.
    assert body == ["model", ("tick", 1)] * total
    assert log[-1] == "close"


@pytest.mark.parametrize("sampler, steps, per_batch", [("ddpm", None, 6), ("ddim", 3, 3)])
def test_sampling_bar_ticks_every_step(recorded, sampler, steps, per_batch):
    log, diffusion = recorded
    diffusion.sample(5, batch_size=2, seed=0, sampler=sampler, steps=steps, progress=True)
    _check_one_tick_per_model_call(log, 3 * per_batch)  # 3 batches of <= 2 images


def test_eval_bar_ticks_every_step(recorded):
    log, diffusion = recorded
    images = torch.zeros(3, 1, 4, 4)
    elbo.bits_per_dim(diffusion, images, batch_size=2, progress=True)
    _check_one_tick_per_model_call(log, 2 * 6)  # 2 batches, T = 6 steps each
