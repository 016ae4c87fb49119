"""The fused ops as torch custom ops: torch.compile traces them, and train(compile=True) works.

The ops are registered in the "fastdiff" namespace (fastdiff/ops.py) with fake implementations
and autograd.  Here: torch.library.opcheck on every op (schema, fake tensors and their
strides, autograd registration, AOT dispatch), a U-Net training step under
torch._dynamo.explain with no graph break on either backend, compiled ops against the torch
reference (forward and backward, Triton kernels under the interpreter), and a short
compile=True training run on CPU.
"""

import pytest
import torch
from helpers import TOLERANCE, require_interpreter
from test_training import TINY, tiny_data

import fastdiff
from fastdiff import UNet, ops
from fastdiff.schedule import NoiseSchedule

S = NoiseSchedule.linear(50)
TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef_x0")


def _images(layout: str, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, 4, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # neither contiguous nor channels_last: the ops make it dense
        x = torch.randn(3, 4, 4, 5, generator=g).transpose(2, 3)
    return x.requires_grad_(requires_grad)


def _op_cases(layout):
    x, noise = _images(layout, True), _images(layout, True, seed=1)
    uncond = _images(layout, True, seed=2)
    t, seed = torch.tensor([0, 7, 49]), torch.tensor([11])
    tab = [S.table(name) for name in ("reverse_coef_z", "reverse_coef_eps", "sigma_beta")]
    clip = [S.table(name) for name in TABLES]
    ddim = (t, torch.tensor([-1, 3, 40]), S.table("alphas_cumprod"))
    return [
        ("q_sample", (x, t, *clip[:2], None, seed)),
        ("q_sample", (x, t, *clip[:2], noise, None)),
        ("noise_loss_sums", (x, None, seed)),
        ("noise_loss_sums", (x, noise, None)),
        ("noise_loss_grad", (x.detach(), torch.rand(3), None, seed)),
        ("reverse_step", (x, noise, t, *tab, None, seed, None, None, None)),
        ("reverse_step", (x, noise, t, *tab, None, seed, *clip)),
        (
            "reverse_step_out",
            (
                torch.empty(3, 4, 5, 4),
                x.detach(),
                noise.detach(),
                t,
                *tab,
                None,
                seed,
                None,
                None,
                None,
            ),
        ),  # fmt: skip
        ("ddim_step", (x, noise, *ddim, 0.5, None, seed, True, "rederive", None, 1.0)),
        ("ddim_step", (x, noise, *ddim, 1.0, uncond, None, True, "diffusers", uncond, 3.0)),
        ("ddim_step", (x, noise, *ddim, 0.0, None, None, False, "rederive", uncond, 0.5)),
        (
            "ddim_step_out",
            (
                torch.empty(3, 4, 5, 4),
                x.detach(),
                noise.detach(),
                *ddim,
                0.5,
                None,
                seed,
                True,
                "rederive",
                uncond.detach(),
                2.0,
            ),
        ),  # fmt: skip
    ]


ALL_OPCHECKS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)
LAYOUT_OPCHECKS = ALL_OPCHECKS[:3]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_custom_ops_pass_opcheck(cpu_triton, layout):
    # AOT dispatch (a dynamic-shape trace, then a run under the interpreter) does not depend
    # on the layout and costs most of the time: it runs once, on contiguous inputs; the
    # strides the fake kernels give each layout are checked by test_faketensor.
    utils = ALL_OPCHECKS if layout == "contiguous" else LAYOUT_OPCHECKS
    for name, args in _op_cases(layout):
        op = getattr(torch.ops.fastdiff, name).default
        result = torch.library.opcheck(op, args, test_utils=utils)
        assert set(result.values()) == {"SUCCESS"}, (name, result)
    result = torch.library.opcheck(
        torch.ops.fastdiff.philox_normal.default, (torch.tensor([3]), [2, 5])
    )
    assert set(result.values()) == {"SUCCESS"}, result


def _training_step():
    model = UNet.preset("tiny")

    def step(x, t, seed):
        z = ops.q_sample(x, t, S, seed=seed, validate=False)
        pred = model(z, t)
        return ops.noise_loss(pred, t, seed=seed, validate=False)

    return step


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unet_training_step_traces_without_graph_breaks(monkeypatch, backend):
    """q_sample -> U-Net -> noise_loss with in-kernel noise from a seed tensor: one graph."""
    if backend == "triton":
        pytest.importorskip("triton")
        require_interpreter()  # CPU tensors
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    x, t, seed = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 17, 49]), torch.tensor([5])
    explained = torch._dynamo.explain(_training_step())(x, t, seed)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _loss_and_sample(x, w, t, seed):
    """A differentiable chain through all three ops (w stands in for a model)."""
    z = ops.q_sample(x, t, S, seed=seed, validate=False)
    pred = z * w
    loss = ops.noise_loss(pred, t, seed=seed, validate=False)
    z_prev = ops.reverse_step(z, pred, t, S, seed=seed + 1, clip_x0=True, validate=False)
    return loss + z_prev.square().mean()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_ops_match_the_reference(monkeypatch, cpu_triton, layout):
    """torch.compile(fullgraph=True) over the custom ops (AOTAutograd: fake tensors and the
    registered backward) gives the reference's value and gradients."""
    x = _images(layout)
    t, seed = torch.tensor([0, 20, 49]), torch.tensor([123])
    w = torch.full((), 0.7, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    compiled = torch.compile(_loss_and_sample, backend="aot_eager", fullgraph=True)
    got = compiled(xg, w, t, seed)
    got.backward()
    monkeypatch.setenv(ops.BACKEND_ENV, "reference")
    wr, xr = w.detach().clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = _loss_and_sample(xr, wr, t, seed)
    want.backward()
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_true_trains_the_tiny_preset_on_cpu(monkeypatch):
    """train(compile=True) runs the model through torch.compile (Inductor, C++ on CPU) and
    logs the losses of the uncompiled run."""
    compiled = []
    real_compile = torch.compile

    def spy(model, **kwargs):
        compiled.append(model)
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    kw = dict(steps=3, batch_size=4, log_every=1, lr=1e-3, precision="fp32", **TINY)
    logs = {False: [], True: []}
    for flag in (False, True):
        fastdiff.train(tiny_data(n=16), compile=flag, on_log=logs[flag].append, **kw)
    assert len(compiled) == 1
    plain, comp = ([r["loss"] for r in logs[flag]] for flag in (False, True))
    assert len(comp) == 3
    torch.testing.assert_close(comp, plain, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The public ops with their default arguments (validate=True) under torch.compile(fullgraph):
# the range checks of t / t_prev, a host read when eager, become device-side asserts while
# tracing (ops._check_t), so tracing does not break and out-of-range steps are still refused.

BAD_T = torch.tensor([0, 7, 50])  # 50 >= T


def _public_calls(layout):
    """name -> (function with default arguments, its inputs, the inputs with a bad t)."""
    x, pred = _images(layout), _images(layout, seed=1)
    t, t_prev, seed = torch.tensor([0, 7, 49]), torch.tensor([-1, 3, 40]), torch.tensor([9])
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    return {
        "q_sample": (lambda x, t: ops.q_sample(x, t, S, seed=5), (x, t), (x, BAD_T)),
        "q_sample/noise": (lambda x, n, t: ops.q_sample(x, t, S, n), (x, pred, t), None),
        "q_sample/seed tensor": (
            lambda x, t, s: ops.q_sample(x, t, S, seed=s), (x, t, seed), (x, BAD_T, seed)
        ),
        "noise_loss": (
            lambda p, t: ops.noise_loss(p, t, seed=5), (pred, t), (pred, torch.tensor([0, -1, 3]))
        ),
        "reverse_step": (
            lambda z, p, t: ops.reverse_step(z, p, t, S, seed=5), (x, pred, t), (x, pred, BAD_T)
        ),
        "ddim_step": (
            lambda z, p, t, tp: ops.ddim_step(z, p, t, tp, S, seed=5),
            (x, pred, t, t_prev),
            (x, pred, t, torch.tensor([-1, 7, 40])),  # t_prev == t
        ),
        "ddim_step/eta": (
            lambda z, p, t, tp: ops.ddim_step(z, p, t, tp, S, seed=5, eta=0.5),
            (x, pred, t, t_prev),
            (x, pred, BAD_T, t_prev),
        ),
        "group_norm_silu": (lambda x, w, b: ops.group_norm_silu(x, 2, w, b), (x, w, b), None),
    }  # fmt: skip


def _check_public_ops_compile(layout):
    torch._dynamo.reset()
    for name, (fn, args, bad) in _public_calls(layout).items():
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        assert torch.equal(compiled(*args), fn(*args)), name
        if bad is None:
            continue
        word = "t_prev" if name == "ddim_step" else "t"
        with pytest.raises(ValueError, match=rf"^{word}: "):  # eager: before any work
            fn(*bad)
        with pytest.raises(RuntimeError, match=rf"{word}: .*checked on device"):
            compiled(*bad)


def test_public_ops_with_defaults_compile_fullgraph(reference_backend):
    """Every public op, default arguments, fullgraph (Dynamo, eager backend) on the torch
    reference: the same result as eager, and a bad t raises in both (ValueError eagerly, a
    RuntimeError from the device-side check when compiled)."""
    _check_public_ops_compile("contiguous")


def test_public_ops_with_defaults_compile_fullgraph_triton(cpu_triton):
    """The same through the Triton kernels (interpreter on CPU); channels_last, so that
    group_norm_silu takes its fused kernel too."""
    _check_public_ops_compile("channels_last")


def _all_ops(x, pred, t, t_prev):
    z = ops.q_sample(x, t, S, seed=3)
    loss = ops.noise_loss(pred, t, seed=3)
    z = ops.reverse_step(z, pred, t, S, seed=4)
    z = ops.ddim_step(z, pred, t, t_prev, S, seed=5)
    return ops.group_norm_silu(z, 2, None, None) * loss


@pytest.mark.slow
def test_public_ops_with_defaults_compile_with_inductor(reference_backend):
    """The default backend (Inductor, C++ on CPU) over a chain of all the ops with their
    defaults: the eager values, and the device-side t check raises from the compiled code."""
    torch._dynamo.reset()
    x, pred = _images("contiguous"), _images("contiguous", seed=1)
    t, t_prev = torch.tensor([0, 7, 49]), torch.tensor([-1, 3, 40])
    compiled = torch.compile(_all_ops, fullgraph=True)
    torch.testing.assert_close(compiled(x, pred, t, t_prev), _all_ops(x, pred, t, t_prev))
    with pytest.raises(RuntimeError, match="t: step indices must be in 0..49"):
        compiled(x, pred, BAD_T, t_prev)
