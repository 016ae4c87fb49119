"""Bad input to the fused ops is refused with a message that names the argument."""

import pytest
import torch

from fastdiff import NoiseSchedule, ops
from fastdiff.ops import backend_for

S = NoiseSchedule.linear(1000)
X = torch.zeros(2, 3, 4, 4)
T = torch.tensor([0, 999])


@pytest.fixture(params=["reference", "triton"], autouse=True)
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("FASTDIFF_BACKEND", request.param)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda: ops.q_sample(X, T, S, torch.zeros(2, 3, 4, 5)),
            ValueError,
            "noise: expected the shape",
        ),
        (lambda: ops.q_sample(X, T[:1], S, seed=0), ValueError, r"t: expected shape \(2,\)"),
        (lambda: ops.q_sample(X, torch.tensor([0, 1000]), S, seed=0), ValueError, r"t: .*0\.\.999"),
        (lambda: ops.q_sample(X, torch.tensor([-1, 3]), S, seed=0), ValueError, "t: step"),
        (lambda: ops.q_sample(X, T.float(), S, seed=0), TypeError, "t: expected an int64"),
        (
            lambda: ops.q_sample(X.to(torch.uint8), T, S, seed=0),
            TypeError,
            "x: expected a floating",
        ),
        (lambda: ops.q_sample(X.long(), T, S, seed=0), TypeError, "integer images"),
        (lambda: ops.q_sample(X, T, S), ValueError, "exactly one"),
        (lambda: ops.q_sample(X, T, S, X, seed=1), ValueError, "exactly one"),
        (lambda: ops.q_sample(X, T, S, seed=-1), ValueError, "seed"),
        (lambda: ops.q_sample(X, T, S, seed=1.5), TypeError, "seed"),
        (lambda: ops.q_sample(X, T, S, seed=torch.tensor([1, 2])), ValueError, "seed"),
        (lambda: ops.q_sample(X, T, "linear", seed=1), TypeError, "schedule"),
        (lambda: ops.q_sample(X[0, 0, 0], T, S, seed=1), ValueError, "x: expected shape"),
        (lambda: ops.noise_loss(X, T, seed=0, reduction="sum"), ValueError, "reduction"),
        (lambda: ops.noise_loss(X, T, seed=0, weights=torch.ones(3)), ValueError, "weights"),
        (lambda: ops.noise_loss(X, T), ValueError, "exactly one"),
        (lambda: ops.noise_loss(X[:0], T[:0], seed=0), ValueError, "pred: expected a non-empty"),
        (lambda: ops.noise_loss(X, T[:1], seed=0), ValueError, "t: expected shape"),
        (lambda: ops.reverse_step(X, X[:1], T, S, seed=0), ValueError, "pred: expected the shape"),
        (lambda: ops.reverse_step(X, X, T, S, seed=0, variance="fixed"), ValueError, "variance"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_schedule_on_another_device():
    """A CPU schedule with tensors elsewhere (meta stands in for CUDA here) is refused."""
    x = torch.zeros(2, 3, 4, 4, device="meta")
    t = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"schedule: .* on cpu .*schedule.to"):
        ops.q_sample(x, t, S, seed=0, validate=False)


def test_t_on_another_device():
    with pytest.raises(ValueError, match="t: expected device"):
        ops.q_sample(X, T.to("meta"), S, seed=0)


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        ops.q_sample(X, T, S, seed=0)


def test_dispatch_rules(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    assert backend_for(X) == "reference"  # CPU tensors default to the reference
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(X) == "triton"
    assert backend_for(X.double()) == "reference"  # fp64 has no kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend_for(X)
