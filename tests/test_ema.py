"""The EMA's warm-up profile (fastdiff.ema): closed forms of the average for ema_power 0 and 1,
diffusers' (1 + k) / (10 + k) as the default, the value train() uses and records, resume
refusing another, and bad values named.

With decay_k = (1 + k) / (k + power + 2) the average after steps 0..k is, by induction,
    power 0:  (w_init + w_0 + ... + w_k) / (k + 2)                         (the plain mean)
    power 1:  2 (w_init + sum_j (j + 2) w_j) / ((k + 2) (k + 3))           (linear weights)
"""

import pytest
import torch
from test_training import tiny_data

import fastdiff
from fastdiff.cli import main
from fastdiff.ema import EMA
from fastdiff.errors import CheckpointError

STEPS = 7
TINY = dict(preset="tiny", T=20, device="cpu", progress=False, warmup_steps=2,
            precision="fp32", channels_last=False, batch_size=2)  # fmt: skip


def run_ema(power: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A 3x2 Linear whose weights are set to a new random draw before each of STEPS updates:
    (the EMA's final weight in float64, [initial weight, w_0, ..., w_{STEPS-1}])."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(2, 3, bias=False).double()
    seen = [model.weight.detach().clone()]
    ema = EMA(model, decay=0.9999, power=power)
    for k in range(STEPS):
        with torch.no_grad():
            model.weight.copy_(torch.randn(3, 2, generator=gen, dtype=torch.float64))
        seen.append(model.weight.detach().clone())
        ema.update(k)
    return ema.shadow.weight, seen


def test_power_zero_is_the_plain_mean_of_every_weight_seen():
    average, seen = run_ema(0.0)
    torch.testing.assert_close(average, torch.stack(seen).mean(0), rtol=0, atol=1e-14)


def test_power_one_weights_step_j_by_j_plus_2():
    average, seen = run_ema(1.0)
    k = STEPS - 1
    want = seen[0] + sum((j + 2) * w for j, w in enumerate(seen[1:]))
    torch.testing.assert_close(average, 2 * want / ((k + 2) * (k + 3)), rtol=0, atol=1e-14)


def test_default_is_diffusers_warm_up():
    ema = EMA(torch.nn.Linear(1, 1))
    for k in [0, 1, 9, 4999, 10**6]:
        assert ema.decay_at(k) == min(0.9999, (1 + k) / (10 + k))


def test_the_given_power_is_used_and_recorded():
    """ema_power=0 through train(): after one step the EMA is the mean of the initial and the
    trained weights (decay_0 = 1/2), and config.json's training record holds it."""
    model = fastdiff.UNet.preset("tiny")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    d = fastdiff.train(tiny_data(n=4), model, steps=1, ema_power=0.0, **TINY)
    assert d.config["train"]["ema_power"] == 0.0
    trained, average = d.model.state_dict(), d.ema_model.state_dict()
    moved = [k for k in init if not torch.equal(trained[k], init[k])]
    assert moved  # the step changed weights, so the mean differs from both ends
    for k in init:
        torch.testing.assert_close(average[k], (init[k] + trained[k]) / 2, rtol=0, atol=1e-7)


def test_resume_needs_the_same_ema_power(tmp_path):
    x = tiny_data(n=4)
    fastdiff.train(x, steps=1, out_dir=tmp_path, **TINY)
    with pytest.raises(CheckpointError, match=r"ema_power=8\.0, this run has ema_power=2\.0"):
        fastdiff.train(x, steps=2, out_dir=tmp_path, resume=True, ema_power=2.0, **TINY)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), True, "8"])
def test_bad_ema_power_is_named_before_work_starts(bad):
    with pytest.raises(ValueError, match="ema_power"):
        fastdiff.train(tiny_data(n=4), steps=1, ema_power=bad, **TINY)


def test_cli_bad_ema_power_is_named(tmp_path, capsys):
    assert main(["train", "--steps", "1", "--ema-power", "-1", "--out", str(tmp_path)]) != 0
    assert "ema_power" in capsys.readouterr().err
